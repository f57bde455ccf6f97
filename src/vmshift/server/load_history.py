"""The hosts' load history (issue 11, item 2): one row per host per history step, read back as each
VM's samples for the DRS snapshot.

Each step the sampler takes the latest stats report of every host the server hears from now
(``HostReport.stats``: the agent measured each VM's cores busy and resident memory) and writes one
``host_load`` row; rows older than the window are deleted in the same transaction, so the table
stays at about hosts x (window / step) rows. The DRS pass reads the window back with
``vm_histories``: one sample per step, oldest first, aligned across the cluster's VMs (a VM that
moved appears in the rows of both hosts over time; a step it is missing from repeats the step
before it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from vmshift.model.host_stream import StatsReport
from vmshift.placement.snapshot import LoadSample
from vmshift.server.db.schema import HostLoadRow, HostRow, utcnow

log = logging.getLogger("vmshift.server.load_history")


@dataclass(frozen=True, slots=True)
class LoadHistorySettings:
    step_s: float = 20.0  # one sample per host this often
    window_s: float = 300.0  # kept this long; the DRS pass averages over it

    @property
    def steps(self) -> int:
        return max(1, round(self.window_s / self.step_s))


@dataclass(frozen=True, slots=True)
class HostSample:
    cpus: int
    memory_total_mib: int
    vms: dict[str, list[float]]  # VM name -> [cores busy, MiB in use]


def host_sample(report: StatsReport, facts_cpus: int, facts_memory_mib: int) -> HostSample:
    """A stats report as a row's content; an older agent that sends no capacity: its facts'."""
    return HostSample(
        cpus=report.cpus or facts_cpus,
        memory_total_mib=report.memory_total_mib or facts_memory_mib,
        vms={v.name: [v.cpu_cores, v.rss_mib] for v in report.vms},
    )


def record(s: Session, samples: Mapping[str, HostSample], at: datetime, window_s: float) -> int:
    """Write one row per host named in ``samples`` and delete rows older than the window; rows
    written."""
    q = select(HostRow.name, HostRow.id).where(HostRow.name.in_(list(samples)))
    ids = {name: hid for name, hid in s.execute(q)}
    for name, sample in samples.items():
        if name in ids:
            s.add(HostLoadRow(host_id=ids[name], at=at, cpus=sample.cpus,
                              memory_total_mib=sample.memory_total_mib, vms=sample.vms))
    s.execute(delete(HostLoadRow).where(HostLoadRow.at < at - timedelta(seconds=window_s)))
    return sum(n in ids for n in samples)


def histories(rows: Iterable[tuple[datetime, dict[str, list[float]]]], now: datetime,
              settings: LoadHistorySettings) -> dict[str, tuple[LoadSample, ...]]:
    """Each VM's samples over the window, one per step, oldest first. Pure.

    Step k covers ``(now - window + k*step, now - window + (k+1)*step]``; a VM's sample in a step is
    its latest there; a step without one repeats the VM's sample before it (before its first: none,
    and the placement state pads the old end with the oldest sample)."""
    n = settings.steps
    start = now - timedelta(seconds=n * settings.step_s)
    per_step: list[dict[str, LoadSample]] = [{} for _ in range(n)]
    for at, vms in sorted(rows, key=lambda r: r[0]):
        k = int((at - start).total_seconds() // settings.step_s)
        if (at - start).total_seconds() % settings.step_s == 0:
            k -= 1  # the step's right edge belongs to it
        if not 0 <= k < n:
            continue
        for name, (cpu, mem) in vms.items():
            per_step[k][name] = LoadSample(cpu=float(cpu), memory_mib=float(mem))
    out: dict[str, list[LoadSample]] = {}
    last: dict[str, LoadSample] = {}
    for k in range(n):
        for name in last.keys() | per_step[k].keys():
            sample = per_step[k].get(name, last.get(name))
            if sample is not None:
                last[name] = sample
                out.setdefault(name, []).append(sample)
    return {name: tuple(samples) for name, samples in out.items()}


def vm_histories(s: Session, host_ids: Iterable[int], settings: LoadHistorySettings,
                 now: datetime | None = None) -> dict[str, tuple[LoadSample, ...]]:
    """The window's samples of every VM seen on ``host_ids`` (a cluster's hosts)."""
    now = now or utcnow()
    since = now - timedelta(seconds=settings.steps * settings.step_s)
    rows = s.execute(select(HostLoadRow.at, HostLoadRow.vms)
                     .where(HostLoadRow.host_id.in_(list(host_ids)), HostLoadRow.at > since)).all()
    return histories(rows, now, settings)


class LoadSampler:
    """Owns the sampling loop (``start`` / ``stop``); ``sample_now`` takes one sample at once (the
    tests and ``drs run`` call it, so a pass sees the loads of the moment)."""

    def __init__(self, sessions: sessionmaker[Session], reports: Callable[[], Mapping[str, HostSample]],
                 settings: LoadHistorySettings) -> None:
        self._sessions = sessions
        self._reports = reports
        self.settings = settings
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="vmshift-load-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def sample_now(self) -> int:
        samples = dict(self._reports())
        if not samples:
            return 0
        return await asyncio.to_thread(self._write, samples)

    def _write(self, samples: dict[str, HostSample]) -> int:
        with self._sessions.begin() as s:
            return record(s, samples, utcnow(), self.settings.window_s)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.step_s)
            try:
                await self.sample_now()
            except Exception:  # one failed sample must not end the history
                log.exception("sampling the hosts' load failed")
