"""Soak helpers: reaching the lab (server through the SDK, agents over HTTP, QEMU processes by
namespace) and injecting one fault into a running migration at a chosen phase.

Used by bench/soak.py; see its docstring for the fault and phase lists.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import psutil

from vmshift.client import VmshiftClient
from vmshift.errors import VmshiftError
from vmshift.lab import lab as labmod
from vmshift.lab import processes, topology
from vmshift.lab.layout import LabLayout, LabRecord

Json = dict[str, Any]
T = TypeVar("T")

FAULTS = (
    "none", "kill_target_qemu", "kill_source_qemu", "cut_link", "kill_source_agent", "kill_target_agent",
    "restart_source_agent", "restart_target_agent", "restart_server", "cancel",
)
# switchover: injected the moment the source agent reports QEMU's stop-and-copy (pre-switchover,
# device) or the completion it follows; confirm: the source agent frozen until the target holds the
# whole stream (between "last byte sent" and "target told to run").
PHASES = ("setup", "precopy", "switchover", "confirm")
ENDED = ("completed", "failed", "cancelled", "lost", "needs_finalize")


def host_num(host: str) -> int:
    return processes.host_number(host)


def other(host: str) -> str:
    return "host-2" if host == "host-1" else "host-1"


@dataclass
class Lab:
    name: str
    api: VmshiftClient

    @property
    def rec(self) -> LabRecord:
        return labmod.get(self.name)

    @property
    def lay(self) -> LabLayout:
        return self.rec.layout

    def agent(self, host: str, timeout: float = 5.0) -> httpx.Client:
        return processes.agent_http(self.lay, host_num(host), timeout=timeout)

    def agent_get(self, host: str, path: str, timeout: float = 5.0) -> Any:
        """GET on host's agent: the JSON, or None when the agent does not answer or answers an error."""
        try:
            with self.agent(host, timeout) as c:
                r = c.get(path)
            return r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def qemus(self, uuid: str) -> list[tuple[int, str]]:
        """(pid, host) of every live QEMU process of the VM, wherever it runs (by host namespace)."""
        lay = self.lay
        by_host = {pid: f"host-{k}" for k in lay.host_numbers
                   for pid in topology.namespace_pids(lay.host_ns(k))}
        found = []
        for pid in processes.qemu_pids(lay):
            try:
                p = psutil.Process(pid)
                if p.status() == psutil.STATUS_ZOMBIE or not any(uuid in a for a in p.cmdline()):
                    continue
            except psutil.Error:
                continue
            found.append((pid, by_host.get(pid, "?")))
        return sorted(found)

    def qemu_on(self, uuid: str, host: str) -> int | None:
        return next((pid for pid, h in self.qemus(uuid) if h == host), None)


def retry(what: str, fn: Callable[[], T], timeout: float = 90.0) -> T:
    """Call fn until it stops raising transport errors (the server restarts in some faults)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except (VmshiftError, httpx.HTTPError) as e:
            status = getattr(e, "status", 500)
            if (status < 500 and not isinstance(e, httpx.HTTPError)) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def wait_until(fn: Callable[[], T | None], timeout: float, interval: float = 0.1) -> T | None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = fn()
        except (VmshiftError, httpx.HTTPError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


@dataclass
class Injection:
    fault: str
    intended_phase: str | None
    phase_hit: str | None = None
    server_phase: str | None = None  # the server's record at the moment of injection
    agent_phase: str | None = None  # the source agent's view (it drives the loop)
    target_stream: str | None = None  # the target QEMU's incoming stream status at injection
    injected: bool = False
    detail: str = ""
    delay_s: float | None = None  # how long the faulted component stayed down / the link cut
    cancel_answer: str | None = None
    notes: list[str] = field(default_factory=list)


class Injector:
    """Drives one fault into migration `mid` (VM `uuid`, src -> dst)."""

    def __init__(self, lab: Lab, rng: random.Random, mid: int, task_id: int, uuid: str,
                 src: str, dst: str) -> None:
        self.lab, self.rng, self.mid, self.task_id, self.uuid = lab, rng, mid, task_id, uuid
        self.src, self.dst = src, dst
        self.frozen = False
        self.live_phase: str | None = None
        self._threads: list[threading.Thread] = []

    # -------------------------------------------------------------- observing
    def migration(self) -> Json:
        return retry("migration", lambda: self.lab.api.get_migration(self.mid))

    def snapshot(self, inj: Injection) -> None:
        try:
            m = self.lab.api.get_migration(self.mid)
            inj.server_phase = f"{m['status']}/{m['phase']}"
        except (VmshiftError, httpx.HTTPError):
            inj.server_phase = "server unreachable"
        a = self.lab.agent_get(self.src, f"/migrations/{self.mid}", timeout=1.0) if not self.frozen else None
        inj.agent_phase = str(a.get("phase")) if isinstance(a, dict) else None
        t = self.lab.agent_get(self.dst, f"/migrations/{self.mid}/incoming", timeout=1.0)
        inj.target_stream = str(t.get("stream")) if isinstance(t, dict) else None

    def classify(self, inj: Injection) -> None:
        """The phase the fault really hit, from what the records said at that moment."""
        if inj.target_stream == "completed" and self.frozen:
            inj.phase_hit = "confirm"  # the stream is whole on the target, the confirm not sent
            return
        if self.live_phase:
            inj.phase_hit = self.live_phase  # what the source agent said right before the fault
            return
        phase = inj.agent_phase or (inj.server_phase or "").partition("/")[2]
        status = (inj.server_phase or "").partition("/")[0]
        if status in ENDED:
            inj.phase_hit = f"after_end:{status}"
        elif phase in ("queued", "check", "estimate", "prepare", ""):
            inj.phase_hit = "setup"
        elif phase in ("precopy", "switchover", "finish", "postcopy", "rollback"):
            inj.phase_hit = "precopy" if phase == "precopy" else phase
        else:
            inj.phase_hit = phase or "unknown"

    # -------------------------------------------------------------- reaching a phase
    def reach(self, phase: str) -> str | None:
        """Wait for the phase; None when reached, else why not (the migration ended first...)."""
        if phase == "setup":
            return None

        def in_precopy() -> Json | bool | None:
            m = self.lab.api.get_migration(self.mid)
            if m["status"] in ENDED:
                return {"ended": m["status"]}
            moving = (m.get("progress") or {}).get("transferred_bytes", 0) > 0
            return bool(m["phase"] == "precopy" and moving)

        got = wait_until(in_precopy, timeout=60, interval=0.05)
        if not got:
            return "pre-copy not reached within 60 s"
        if isinstance(got, dict):
            return f"migration ended ({got['ended']}) before pre-copy was seen"
        if phase == "precopy":
            time.sleep(self.rng.uniform(0.0, 0.6))
            return None
        if phase == "switchover":
            with self.lab.agent(self.src, timeout=2.0) as c:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    seen: Json = {}
                    try:
                        r = c.get(f"/migrations/{self.mid}")
                        seen = r.json() if r.status_code == 200 else {}
                    except (httpx.HTTPError, ValueError):
                        seen = {}
                    if seen.get("phase") in ("switchover", "finish", "completed"):
                        self.live_phase = str(seen["phase"])
                        return None
                    if seen.get("status") in ENDED:
                        return f"migration ended ({seen.get('status')}) before the switchover was seen"
                    time.sleep(0.003)
            return "the switchover was not seen within 60 s"
        # switchover: freeze the source agent; QEMU finishes the stream on its own, the target
        # holds it paused; the fault then lands between "last byte sent" and "target told to run".
        processes.kill_agent(self.lab.name, self.src, signal.SIGSTOP)
        self.frozen = True

        def stream_done() -> bool:
            s = self.lab.agent_get(self.dst, f"/migrations/{self.mid}/incoming", timeout=2.0)
            return isinstance(s, dict) and s.get("stream") == "completed"

        if not wait_until(stream_done, timeout=45, interval=0.1):
            return "the target's stream did not complete within 45 s with the source agent frozen"
        return None

    def thaw(self) -> None:
        if self.frozen:
            pid = self.lab.rec.pids.get(f"host-{host_num(self.src)}")
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            self.frozen = False

    # -------------------------------------------------------------- the faults
    def inject(self, fault: str, phase: str | None) -> Injection:
        inj = Injection(fault, phase)
        if fault == "none":
            return inj
        assert phase is not None
        try:
            why_not = self.reach(phase)
            if why_not:
                inj.detail = why_not
                self.snapshot(inj)
                self.classify(inj)
                inj.phase_hit = "not_reached"
                return inj
            if fault == "kill_target_qemu" and phase == "setup":
                # the receiving QEMU appears in prepare: kill it as soon as it exists
                pid = wait_until(lambda: self.lab.qemu_on(self.uuid, self.dst), timeout=30, interval=0.02)
                if pid is None:
                    inj.detail = "no target QEMU appeared within 30 s"
                    self.snapshot(inj)
                    self.classify(inj)
                    return inj
            if self.live_phase:  # no time to lose: inject first, look afterwards
                getattr(self, f"_{fault}")(inj)
                inj.injected = True
                self.snapshot(inj)
                self.classify(inj)
            else:
                self.snapshot(inj)
                self.classify(inj)
                getattr(self, f"_{fault}")(inj)
                inj.injected = True
        finally:
            self.thaw()
        self.undo(inj)
        return inj

    def _kill_qemu(self, host: str, inj: Injection) -> None:
        pid = self.lab.qemu_on(self.uuid, host)
        if pid is None:
            inj.detail = f"no QEMU of the VM on {host} to kill"
            return
        os.kill(pid, signal.SIGKILL)
        inj.detail = f"SIGKILL QEMU {pid} on {host}"

    def _kill_target_qemu(self, inj: Injection) -> None:
        self._kill_qemu(self.dst, inj)

    def _kill_source_qemu(self, inj: Injection) -> None:
        self._kill_qemu(self.src, inj)

    def _cut_link(self, inj: Injection) -> None:
        topology.set_migration_link(self.lab.lay, host_num(self.src), False)
        inj.delay_s = round(self.rng.choice([self.rng.uniform(0.5, 4.0), self.rng.uniform(4.0, 14.0)]), 2)
        inj.detail = f"migration link of {self.src} down for {inj.delay_s} s"

    def _agent_pid(self, host: str) -> int:
        pid = self.lab.rec.pids.get(f"host-{host_num(host)}")
        assert pid is not None, f"agent of {host} not recorded"
        return pid

    def _kill_agent(self, host: str, inj: Injection) -> None:
        processes.kill_agent(self.lab.name, host, signal.SIGKILL)
        if host == self.src:
            self.frozen = False  # a killed process needs no thaw
        # mostly short outages; a target agent down at the switchover sometimes outlasts the
        # source's 20 s of confirm retries (that ends in needs_finalize)
        long = (host == self.dst and inj.intended_phase in ("switchover", "confirm")
                and self.rng.random() < 0.4)
        inj.delay_s = round(self.rng.uniform(22.0, 28.0) if long else self.rng.uniform(0.2, 5.0), 2)
        inj.detail = f"SIGKILL agent of {host}, restarted after {inj.delay_s} s"

    def _restart_agent(self, host: str, inj: Injection) -> None:
        pid = self._agent_pid(host)
        os.kill(pid, signal.SIGTERM)
        if host == self.src and self.frozen:
            os.kill(pid, signal.SIGCONT)  # a stopped process handles SIGTERM only once continued
            self.frozen = False
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.wait_procs([psutil.Process(pid)], timeout=15)
        if psutil.pid_exists(pid):
            inj.notes.append("agent ignored SIGTERM for 15 s: SIGKILL")
            os.kill(pid, signal.SIGKILL)
        processes.start_agent(self.lab.name, host)
        inj.detail = f"SIGTERM + start of the agent of {host}"

    def _kill_source_agent(self, inj: Injection) -> None:
        self._kill_agent(self.src, inj)

    def _kill_target_agent(self, inj: Injection) -> None:
        self._kill_agent(self.dst, inj)

    def _restart_source_agent(self, inj: Injection) -> None:
        self._restart_agent(self.src, inj)

    def _restart_target_agent(self, inj: Injection) -> None:
        self._restart_agent(self.dst, inj)

    def _restart_server(self, inj: Injection) -> None:
        processes.restart_server(self.lab.name)
        inj.detail = "SIGTERM + start of the server"

    def _cancel(self, inj: Injection) -> None:
        def cancel() -> None:
            try:
                self.lab.api.cancel_task(self.task_id)
                inj.cancel_answer = "accepted"
            except VmshiftError as e:
                inj.cancel_answer = f"refused: {e}"[:300]

        if self.frozen:  # the server asks the source agent, frozen: answer it after the thaw
            t = threading.Thread(target=cancel, daemon=True)
            t.start()
            self._threads.append(t)
            time.sleep(0.5)
        else:
            cancel()
        inj.detail = "cancel through the API"

    def undo(self, inj: Injection) -> None:
        """Bring back what the fault took away, as an operator would, after its delay."""
        for t in self._threads:
            t.join(timeout=60)
        if inj.fault == "cut_link" and inj.injected:
            time.sleep(inj.delay_s or 0)
            topology.set_migration_link(self.lab.lay, host_num(self.src), True)
        if inj.fault in ("kill_source_agent", "kill_target_agent") and inj.injected:
            time.sleep(inj.delay_s or 0)
        restore_components(self.lab, inj.notes)


class DualWatch(threading.Thread):
    """Polls both agents' /vms during a migration and notes when both report the VM running.

    The two reads are sequential, so one sample that spans the switchover can show the source
    before its STOP and the target after its RESUME: only a state seen in two samples in a row
    (>= 250 ms apart) counts as running twice; a single one is kept as `transient` with its read
    times, to be compared with the migration's timeline.
    """

    def __init__(self, lab: Lab, uuid: str) -> None:
        super().__init__(daemon=True)
        self.lab, self.uuid = lab, uuid
        self.stop_event = threading.Event()
        self.seen: list[Json] = []
        self.transient: list[Json] = []
        self.samples = 0

    def run(self) -> None:
        hosts = [f"host-{k}" for k in self.lab.lay.host_numbers]
        previous_dual = False
        while not self.stop_event.wait(0.25):
            states, reads = {}, {}
            for h in hosts:
                t0 = time.time()
                listed = self.lab.agent_get(h, "/vms", timeout=1.0)
                vm = (next((v for v in listed if v.get("uuid") == self.uuid), None)
                      if isinstance(listed, list) else None)
                states[h] = (vm or {}).get("qemu_status")
                reads[h] = [round(t0, 4), round(time.time(), 4)]
            self.samples += 1
            dual = sum(1 for st in states.values() if st == "running") > 1
            sample = {"at": time.time(), "states": states, "reads": reads}
            if dual and previous_dual and len(self.seen) < 5:
                self.seen.append(sample)
            elif dual and len(self.transient) < 5:
                self.transient.append(sample)
            previous_dual = dual

    def stop(self) -> list[Json]:
        self.stop_event.set()
        self.join(timeout=5)
        return self.seen


def restore_components(lab: Lab, notes: list[str]) -> None:
    """Every agent and the server run, every migration link is up."""
    lay = lab.lay
    for k in lay.host_numbers:
        topology.set_migration_link(lay, k, True)
        pid = lab.rec.pids.get(f"host-{k}")
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if not processes.agent_running(lab.name, k):
            processes.start_agent(lab.name, k)
            notes.append(f"started the agent of host-{k}")
    rec = lab.rec
    pid = rec.pids.get("server")
    alive = pid is not None and psutil.pid_exists(pid)
    if not alive:
        rec.pids.pop("server", None)
        rec.save()
        processes.start_server(lab.name)
        notes.append("started the server")
