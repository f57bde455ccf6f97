"""The storage benchmark's hands in the lab: guests, host-side data, moves through the server, checks.

Everything goes through the server's API (``VmshiftClient``) as a user's move would, except the
data: disks are filled from the host side with ``qemu-io`` while their VM runs no QEMU, with a
non-zero pattern (zeros would be skipped by every copy and measure nothing). The guest checks are
``bench.suite.run``'s: after a move the guest must finish one more memtest pass with 0 mismatches,
answer its echo port and have more durable disk-log records than before the move.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.suite.run import guest_check, verify, wait_ready
from bench.suite.scenarios import Scenario

from vmshift.client import VmshiftClient
from vmshift.client.agent import AgentClient
from vmshift.errors import VmshiftError
from vmshift.lab import processes
from vmshift.lab.layout import LabRecord
from vmshift.model.enums import PowerAction, PowerState, TaskState
from vmshift.model.migration import MigrationStatus

Json = dict[str, Any]
MIB = 1 << 20
PATTERN = "0x5a"
MOVE_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Fill:
    """``qemu-io write -P PATTERN OFFSET LENGTH`` into disk ``disk`` of the guest."""

    disk: int
    offset_mib: int
    length_mib: int


@dataclass(frozen=True)
class Guest:
    vm: str
    scenario: Scenario  # memory, vCPUs, memtest; its kernel_args add the disk log
    disks_mib: tuple[int, ...]
    fills: tuple[Fill, ...] = ()
    extra_args: str = ""  # more kernel arguments (e.g. vmshift.diskwrite=...)
    disklog_rate_per_s: int | None = None  # None: the guest's default (20 records/s)

    @property
    def kernel_args(self) -> str:
        args = self.scenario.kernel_args
        if self.disklog_rate_per_s is not None:
            args = args.replace("vmshift.disklog=1", f"vmshift.disklog=1,{self.disklog_rate_per_s}")
        return f"{args} {self.extra_args}".strip()


@dataclass
class Failures:
    """Every failed guest check of the run, each a sentence; the report counts them."""

    items: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.items.append(what)
        return ok


# ---------------------------------------------------------------- host-side files


def run(cmd: list[str], timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise VmshiftError(
            f"{' '.join(cmd[:3])} failed: {(proc.stderr or proc.stdout).strip()[-400:]}",
            hint="Check the command by hand; the lab stays as it is until the benchmark tears it down.",
        )
    return proc


def virtual_size(path: Path) -> int:
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout)
    return int(info["virtual-size"])


def fill(path: Path, f: Fill) -> None:
    run(["qemu-io", "-f", "qcow2", "-c", f"write -P {PATTERN} {f.offset_mib}M {f.length_mib}M", str(path)])


def pattern_intact(path: Path, f: Fill) -> bool:
    """Read the filled range back from the file with ``read -P`` (qemu-io compares every byte)."""
    proc = subprocess.run(
        [
            "qemu-io",
            "-r",
            "-f",
            "qcow2",
            "-c",
            f"read -P {PATTERN} {f.offset_mib}M {f.length_mib}M",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.returncode == 0 and "verification failed" not in (proc.stdout + proc.stderr).lower()


def disk_paths(rec: LabRecord, api: VmshiftClient, vm: str) -> list[Path]:
    """Host paths of the VM's disks, as the inventory names them now (each disk names its datastore)."""
    disks = api.get_vm(vm)["disks"]
    return [rec.layout.datastores_dir / d["datastore"] / vm / d["file"] for d in disks]


DD_RATE = re.compile(r"(\d+) bytes .* copied, ([0-9.]+) s")


def dd_direct(folder: Path, mib: int) -> Json:
    """``dd if=/dev/zero of=FOLDER/ddtest bs=1M count=MIB oflag=direct``: dd's own bytes and seconds."""
    target = folder / "ddtest"
    try:
        proc = run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={mib}", "oflag=direct"])
    finally:
        target.unlink(missing_ok=True)
    m = DD_RATE.search(proc.stderr)
    if not m:
        raise VmshiftError(
            f"dd's summary was not understood: {proc.stderr.strip()[-200:]}",
            hint="Run the dd command by hand to see what it prints.",
        )
    written, seconds = int(m.group(1)), float(m.group(2))
    return {
        "bytes": written,
        "seconds": seconds,
        "bps": written / seconds if seconds > 0 else None,
        "command": f"dd if=/dev/zero of={target} bs=1M count={mib} oflag=direct",
    }


# ---------------------------------------------------------------- guests through the server


def create(api: VmshiftClient, g: Guest, host: str = "host-1", datastore: str = "shared-1") -> None:
    """Define the guest without starting it, so its disks can be filled first."""
    task = api.create_vm({
        "name": g.vm, "host": host, "cpus": g.scenario.cpus, "memory_mib": g.scenario.memory_mib,
        "datastore": datastore, "networks": ["VM Network"], "disks_mib": list(g.disks_mib),
        "image": "lab-guest", "start": False, "kernel_args": g.kernel_args,
    })  # fmt: skip
    final = api.wait_task(task["id"], timeout=300)
    if final["state"] != TaskState.SUCCESS:
        raise VmshiftError(f"Creating {g.vm} failed: {final.get('error')}", hint="See the lab's server log.")


def power(api: VmshiftClient, vm: str, action: PowerAction, want: PowerState) -> None:
    final = api.wait_task(api.power_vm(vm, action)["id"], timeout=300)
    if final["state"] != TaskState.SUCCESS:
        raise VmshiftError(f"{action.value} of {vm} failed: {final.get('error')}", hint="See the server log.")
    wait_power(api, vm, want)


def wait_power(api: VmshiftClient, vm: str, want: PowerState, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (state := api.get_vm(vm)["power_state"]) != want:
        if time.monotonic() > deadline:
            raise VmshiftError(
                f"{vm} is {state}, not {want.value}, after {timeout_s:.0f} s.", hint="See the agent's log."
            )
        time.sleep(0.25)


def boot(rec: LabRecord, api: VmshiftClient, g: Guest) -> tuple[str, Json]:
    """Power the guest on and wait until it answers with a memtest pass done; its IP and status."""
    power(api, g.vm, PowerAction.START, PowerState.POWERED_ON)
    ip = str(api.get_vm(g.vm)["ip"])
    return ip, wait_ready(rec, ip, g.scenario)


def remove(api: VmshiftClient, vm: str) -> None:
    with contextlib.suppress(VmshiftError):  # already off
        api.wait_task(api.power_vm(vm, PowerAction.STOP)["id"], timeout=120)
    api.wait_task(api.delete_vm(vm)["id"], timeout=120)


class AgentWatch:
    """The source agent's own view of a disk move: ``GET /api/v1/moves/ID`` every 0.1 s in a thread.

    Each phase's first sighting (the move's ``elapsed_s`` then) and when every disk was first READY
    split the record's ``total_ms`` into prepare, copy, pivot and finish, to within a poll.
    """

    POLL_S = 0.1  # the agent that answers also runs the move: no faster

    def __init__(self, rec: LabRecord, host: str, move_id: int) -> None:
        self.address = rec.layout.agent_address(int(host.rsplit("-", 1)[1]))
        self.credentials = processes.agent_credentials(rec.layout)
        self.move_id = move_id
        self.phases: dict[str, float] = {}
        self.all_ready_s: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._poll()), daemon=True)

    def __enter__(self) -> AgentWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    async def _poll(self) -> None:
        client = AgentClient(self.address, self.credentials, timeout_s=5)
        try:
            while not self._stop.is_set():
                with contextlib.suppress(VmshiftError):  # not started yet, or ended and gone
                    p = await client.move_progress(self.move_id)
                    self.phases.setdefault(p.phase.value, round(p.elapsed_s, 3))
                    if self.all_ready_s is None and p.disks and all(d.ready for d in p.disks):
                        self.all_ready_s = round(p.elapsed_s, 3)
                await asyncio.sleep(self.POLL_S)
        finally:
            await client.aclose()

    def report(self) -> Json:
        return {"phases_s": self.phases, "all_ready_s": self.all_ready_s}


def move(
    api: VmshiftClient, vm: str, datastore: str, host: str | None = None, rec: LabRecord | None = None
) -> Json:
    """One move through the server, as ``vmshift vm migrate VM [--host H] --datastore DS`` does.

    Returns the migration record's figures, the wall time this side saw each phase of the record
    first, and with ``rec`` the source agent's own phase times (AgentWatch).
    """
    source_host = str(api.get_vm(vm)["host"])
    t0 = time.monotonic()
    started = api.migrate_vm(vm, host, datastore=datastore)
    mid = int(started["migration_id"])
    with contextlib.ExitStack() as stack:
        watch = stack.enter_context(AgentWatch(rec, source_host, mid)) if rec is not None else None
        result = _follow(api, started, mid, t0)
    result["agent"] = watch.report() if watch is not None else None
    return result


def _follow(api: VmshiftClient, started: Json, mid: int, t0: float) -> Json:
    seen: dict[str, float] = {}

    def watch(_task: Json) -> None:
        phase = str(api.get_migration(mid).get("phase"))
        seen.setdefault(phase, round(time.monotonic() - t0, 3))

    api.wait_task(started["id"], timeout=MOVE_TIMEOUT_S, on_update=watch)
    wall_s = time.monotonic() - t0
    m = api.get_migration(mid)
    metrics = m.get("metrics") or {}
    return {
        "migration_id": mid,
        "kind": m.get("kind"),
        "status": m.get("status"),
        "ok": m.get("status") == MigrationStatus.COMPLETED,
        "error": m.get("error"),
        "from": f"{m.get('source_host')}/{m.get('source_datastore')}",
        "to": f"{m.get('target_host')}/{m.get('target_datastore')}",
        "total_ms": metrics.get("total_ms"),
        "bytes_sent": metrics.get("bytes_sent"),
        "mean_throughput_bps": metrics.get("mean_throughput_bps"),
        "pivot_ms": metrics.get("downtime_ms"),
        "wall_s": round(wall_s, 3),
        "phases_seen_s": seen,
        "progress": m.get("progress"),
    }


def verify_running(rec: LabRecord, ip: str, before: Json, g: Guest, fails: Failures, what: str) -> Json:
    """The guest after a live move: bench.suite.run.verify (memtest pass, echo, disk log grew)."""
    v = verify(rec, ip, before, g.scenario)
    fails.check(bool(v["verified"]), f"{what}: guest check failed ({v})")
    return v


def verify_booted(
    rec: LabRecord, api: VmshiftClient, g: Guest, durable_before: int, fails: Failures, what: str
) -> Json:
    """A cold-moved guest: its data reads back, it boots, its disk log kept every durable record."""
    paths = disk_paths(rec, api, g.vm)
    data_ok = all(pattern_intact(paths[f.disk], f) for f in g.fills)
    fails.check(data_ok, f"{what}: the {PATTERN} pattern did not read back from the moved disk")
    ip, status = boot(rec, api, g)
    before = {"memtest": {"passes": 0}, "disklog": {"durable_seq": durable_before}}
    v = verify(rec, ip, before, g.scenario)
    dl = status.get("disklog") or {}
    boot_ok = dl.get("corrupt_at_boot") == 0 and (dl.get("first_seq") or 0) > durable_before
    fails.check(bool(v["verified"]) and boot_ok, f"{what}: guest check after boot failed ({v}, {dl})")
    last = guest_check(rec, ip)
    power(api, g.vm, PowerAction.STOP, PowerState.POWERED_OFF)
    return {
        "verified": bool(v["verified"]) and boot_ok and data_ok,
        "data_ok": data_ok,
        "disklog_at_boot": dl,
        "durable_seq": int((last.get("disklog") or {}).get("durable_seq") or 0),
    }
