"""One migration leg driven over QMP with a peer's policy, between QEMUs this benchmark owns.

The guest starts life under vmshift (its agent started the QEMU, tap and disks); for the peers'
legs the agents and the server are stopped (SIGTERM keeps the QEMU running and frees its QMP
socket, which takes one client at a time) and the benchmark becomes the management layer: it starts
the receiving QEMU in the other host's namespace from the source's own command line (with its own
QMP socket, pid file, serial log and tap on the host's VM bridge), applies the policy, migrates, and
either finishes the move (target runs, source quits) or cancels it (source keeps running, target
removed). The guest then lives on in whichever QEMU holds it, for the next peer's leg.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmshift.lab.layout import HOST_VM_BRIDGE, LabLayout
from vmshift.migration.samples import MigrationSample, QemuMigrationStatus, summarize
from vmshift.qemu import migration_qmp as mq
from vmshift.qemu.qmp import QmpSession

from .policies import Policy

Q = QemuMigrationStatus
Json = dict[str, Any]
ENDED = (Q.COMPLETED, Q.FAILED, Q.CANCELLED)
#: QEMU 10.0.2's own migration parameters (checked live), put back on a source before each peer's leg:
#: the source may be a QEMU that vmshift (or the previous peer) set up differently.
QEMU_DEFAULT_PARAMETERS: dict[str, Any] = {
    "max-bandwidth": 128 * mq.MIB,
    "downtime-limit": 300,
    "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10,
    "max-cpu-throttle": 99,
    "throttle-trigger-threshold": 50,
    "cpu-throttle-tailslow": False,
    "xbzrle-cache-size": 64 * mq.MIB,
    "avail-switchover-bandwidth": 0,
    "max-postcopy-bandwidth": 0,
    "multifd-channels": 2,
}


@dataclass
class QemuVm:
    """Where the guest's QEMU runs now."""

    host: int
    pid: int
    argv: list[str]
    qmp_path: Path
    tap: str
    owned_tap: bool = False  # a tap this benchmark created (and removes)


def _opt(argv: list[str], flag: str, pred: str) -> int:
    for i, a in enumerate(argv[:-1]):
        if a == flag and pred in argv[i + 1]:
            return i + 1
    raise RuntimeError(f"no {flag} ... {pred} in the QEMU command line")


def vm_from_pid(pid: int, host: int) -> QemuVm:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")
    qmp = re.search(r"path=([^,]+)", argv[_opt(argv, "-chardev", "id=qmp0")])
    tap = re.search(r"ifname=([^,]+)", argv[_opt(argv, "-netdev", "tap,")])
    if qmp is None or tap is None:
        raise RuntimeError(f"QEMU {pid} has no QMP socket path or tap name on its command line")
    return QemuVm(host, pid, argv, Path(qmp.group(1)), tap.group(1))


def agent_vm(lay: LabLayout, host: int, vm: str) -> QemuVm:
    """The guest's QEMU as the host's agent started it (its pid file in the agent's state dir)."""
    pidfile = lay.agent_state_dir(host) / "vms" / vm / "qemu.pid"
    return vm_from_pid(int(pidfile.read_text().split()[0]), host)


def _target_argv(src: list[str], work: Path, tap: str, paused: bool) -> list[str]:
    argv, skip = [], 0
    for a in src:
        if skip:
            skip -= 1
            continue
        if a == "-S":
            continue
        if a in ("-incoming", "-trace", "-D"):
            skip = 1
            continue
        argv.append(a)
    argv[_opt(argv, "-chardev", "id=qmp0")] = f"socket,id=qmp0,path={work / 'qmp.sock'},server=on,wait=off"
    argv[_opt(argv, "-chardev", "id=serial0")] = f"file,id=serial0,path={work / 'serial.log'},append=on"
    argv[argv.index("-pidfile") + 1] = str(work / "qemu.pid")
    i = _opt(argv, "-netdev", "tap,")
    argv[i] = re.sub(r"ifname=[^,]+", f"ifname={tap}", argv[i])
    return [*argv, *(["-S"] if paused else []), "-incoming", "defer"]


def _ip(ns: str, *args: str, check: bool = True) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=check, capture_output=True, text=True)


def remove_tap(lay: LabLayout, vm: QemuVm) -> None:
    if vm.owned_tap:
        _ip(lay.host_ns(vm.host), "link", "del", vm.tap, check=False)


def kill_qemu(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        import os
        import signal

        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            import os

            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)


def start_target(lay: LabLayout, src: QemuVm, work: Path, tag: str, paused: bool) -> QemuVm:
    host = 2 if src.host == 1 else 1
    ns = lay.host_ns(host)
    work.mkdir(parents=True, exist_ok=True)
    tap = f"bt{tag}"[:15]
    _ip(ns, "link", "del", tap, check=False)
    _ip(ns, "tuntap", "add", "dev", tap, "mode", "tap")
    _ip(ns, "link", "set", "dev", tap, "master", HOST_VM_BRIDGE)
    _ip(ns, "link", "set", "dev", tap, "up")
    argv = _target_argv(src.argv, work, tap, paused)
    with (work / "qemu.log").open("w") as log:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 30
    pidfile = work / "qemu.pid"
    while not (pidfile.exists() and pidfile.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the target QEMU did not start: {(work / 'qemu.log').read_text()[-500:]}")
        time.sleep(0.05)
    return QemuVm(host, int(pidfile.read_text().split()[0]), argv, work / "qmp.sock", tap, owned_tap=True)


async def _status(qmp: QmpSession) -> Q:
    return Q.parse(str((await mq.query_migrate(qmp)).get("status", "none")))


async def _target_runs(dq: QmpSession, paused: bool, timeout_s: float = 20.0) -> bool:
    """After the source completed: the target loaded the stream and runs (sent `cont` if it waits)."""
    deadline = time.monotonic() + timeout_s
    while await _status(dq) is not Q.COMPLETED:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    if paused:
        await dq.cont()
    while not (await dq.query_status()).running:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def drive(
    lay: LabLayout,
    src: QemuVm,
    policy: Policy,
    memory_mib: int,
    work: Path,
    tag: str,
    limit_s: float,
    on_start: Any = None,
) -> tuple[QemuVm, Json]:
    """Migrate `src` to the other host under `policy`; returns where the guest runs after and the result.

    The result's `converged` is True only when the target runs the guest. A policy's own abort, or
    the benchmark's `limit_s`, cancels the migration and the guest stays in `src`.
    """
    plan = policy.start(memory_mib)
    dst = start_target(lay, src, work, tag, plan.target_paused)
    out: Json = {
        "peer": policy.name,
        "from": src.host,
        "to": dst.host,
        "caps": plan.caps,
        "params": {k: v for k, v in plan.params.items()},
        "target_paused": plan.target_paused,
        "changes": [],
        "converged": False,
        "abort": None,
        "error": None,
    }
    dq = await QmpSession.connect(dst.qmp_path, timeout_s=20, name="bench-dst")
    sq = await QmpSession.connect(src.qmp_path, timeout_s=20, name="bench-src")
    samples: list[MigrationSample] = []
    finished = False
    try:
        await mq.set_capabilities(dq, plan.target_caps)
        await mq.migrate_incoming(dq, f"tcp:{lay.host_mig_address(dst.host)}:0")
        uri = f"tcp:{lay.host_mig_address(dst.host)}:{await mq.listening_port(dq)}"
        # events only let the driver notice a pause at pre-switchover at once (as libvirt does);
        # a policy without events still acts only at its own polls
        known = await mq.query_capabilities(sq)
        caps = {**{k: False for k in known}, "events": True, **plan.caps}
        await mq.set_capabilities(sq, caps)
        await mq.set_parameters(sq, {**QEMU_DEFAULT_PARAMETERS, **plan.params})
        out["parameters_in_force"] = {
            k: v
            for k, v in (await mq.query_parameters(sq)).items()
            if k
            in (
                "max-bandwidth",
                "downtime-limit",
                "cpu-throttle-initial",
                "cpu-throttle-increment",
                "xbzrle-cache-size",
            )
        }
        if on_start:
            on_start()
        start = time.monotonic()
        await mq.migrate(sq, uri)
        poll = plan.poll_s
        next_poll = start + poll
        seen = sq.last_seq
        status = Q.SETUP
        while True:
            wait = max(0.0, next_poll - time.monotonic())
            e = await sq.wait_event("MIGRATION", timeout_s=wait, after_seq=seen)
            if e is not None:
                seen = e.seq
                if str(e.data.get("status")) == "pre-switchover":
                    await sq.execute("migrate-continue", {"state": "pre-switchover"})
                if str(e.data.get("status")) in ("completed", "failed", "cancelled"):
                    if not plan.caps.get("events"):  # such a peer only learns it at its next poll
                        await asyncio.sleep(max(0.0, next_poll - time.monotonic()))
                    break
                if not plan.caps.get("events") or time.monotonic() < next_poll:
                    continue
            now = time.monotonic()
            sample = MigrationSample.from_qmp(await mq.query_migrate(sq), now - start)
            status = sample.status
            samples.append(sample)
            if status in ENDED:
                break
            if status is Q.PRE_SWITCHOVER:
                await sq.execute("migrate-continue", {"state": "pre-switchover"})
            d = policy.step(now - start, sample)
            if d.params:
                await mq.set_parameters(sq, d.params)
                out["changes"].append({"t_s": round(now - start, 2), **d.params})
            if d.poll_s:
                poll = d.poll_s
            if d.abort or now - start >= limit_s:
                out["abort"] = d.abort or f"not converged within the benchmark's {limit_s:g} s"
                break
            next_poll = now + poll
        final = MigrationSample.from_qmp(await mq.query_migrate(sq), time.monotonic() - start)
        samples.append(final)
        out["elapsed_s"] = round(time.monotonic() - start, 2)
        if final.status is Q.COMPLETED:
            out["converged"] = finished = await _target_runs(dq, plan.target_paused)
        elif out["abort"] or final.status in (Q.ACTIVE, Q.SETUP, Q.PRE_SWITCHOVER):
            await mq.migrate_cancel(sq)
            deadline = time.monotonic() + 30
            while (st := await _status(sq)) not in ENDED:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the source did not settle after migrate_cancel ({st.value})")
                await asyncio.sleep(0.05)
            if st is Q.COMPLETED:  # raced to the end after all
                out["converged"] = finished = await _target_runs(dq, plan.target_paused)
                out["abort"] = None
        else:
            out["error"] = final.error or f"QEMU ended in {final.status.value}"
        if not finished:
            kill_qemu(dst.pid)  # first: the guest must never run in two places
            if not (await sq.query_status()).running:
                await sq.cont()
        m = summarize(samples)
        out["metrics"] = m.model_dump(exclude={"timeline"})
        out["total_ms"] = final.total_time_ms if finished else None
        out["downtime_ms"] = final.downtime_ms if finished else None
        out["bytes_sent"] = m.bytes_sent
        out["remaining_at_end"] = final.remaining_bytes
        out["first_pass_normal_bytes"] = first_pass_normal_bytes(samples)
        out["samples"] = [
            [
                round(s.time_s, 2),
                s.status.value,
                s.transferred_bytes,
                s.remaining_bytes,
                s.dirty_sync_count,
                s.throttle_percent,
                s.expected_downtime_ms,
            ]
            for s in samples
        ]
    finally:
        with contextlib.suppress(Exception):
            if finished:
                await sq.quit()
        await sq.close()
        await dq.close()
    if finished:
        kill_qemu(src.pid)
        remove_tap(lay, src)
        return dst, out
    kill_qemu(dst.pid)
    remove_tap(lay, dst)
    return src, out


def first_pass_normal_bytes(samples: list[MigrationSample]) -> int | None:
    """The non-zero bytes QEMU had sent when its first pass over memory ended (every data page once)."""
    for s in samples:
        if s.dirty_sync_count >= 2:
            return s.normal_bytes
    done = [s for s in samples if s.status is Q.COMPLETED]
    return done[0].normal_bytes if done else None
