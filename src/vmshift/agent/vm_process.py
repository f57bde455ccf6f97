"""One QEMU process of this host and what can be read from it: whether it lives, its QMP session
once it answers, its kill, and its runtime view (power state, CPU and memory use, I/O errors).

The supervisor (agent/supervisor.py) owns the processes and decides what happens to them; this
module holds what a single process needs, with no knowledge of the other VMs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from vmshift.agent.guest_memory import guest_ram_zero_fraction
from vmshift.agent.suspend import saved_state
from vmshift.errors import QemuError
from vmshift.model.enums import PowerState, QemuRunState
from vmshift.model.vm import VmRuntime, VmSpec
from vmshift.qemu.cmdline import VmPaths
from vmshift.qemu.qmp import QmpSession

log = logging.getLogger(__name__)

START_TIMEOUT_S = 15.0  # a started QEMU answers on QMP within this, or the start fails
KILL_WAIT_S = 5.0
STATUS_TIMEOUT_S = 3.0  # query-status of a view


@dataclass
class VmProcess:
    """What the agent holds for one VM it runs (or ran)."""

    spec: VmSpec
    paths: VmPaths
    pid: int | None = None
    popen: subprocess.Popen[bytes] | None = None
    qmp: QmpSession | None = None
    taps: list[str] = field(default_factory=list)
    died: bool = False
    exit_reason: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    qmp_lost: bool = False  # a reconnect failed and was logged; log again only after success
    ended_unseen: str | None = None  # the guest ended while no QMP session listened (found by status)
    io_error_seq: int = 0  # the BLOCK_IO_ERROR last logged
    storage_lost: str | None = None  # its iSCSI target stopped answering (agent/storage_watch.py)

    def alive(self) -> bool:
        """The recorded process still runs, and is this VM's QEMU (a pid can be reused)."""
        if self.pid is None:
            return False
        if self.popen is not None and self.popen.poll() is not None:
            return False
        return process_is_qemu_of(self.pid, self.spec.uuid)


def process_is_qemu_of(pid: int, vm_uuid: str) -> bool:
    """True if ``pid`` is alive (not a zombie) and its command line carries the VM's uuid."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and vm_uuid in proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def listen_unix(path: Path) -> int:
    """Bind and listen on the QMP socket for QEMU (root-owned, 0600 by the agent's umask) and return
    the fd QEMU inherits: QEMU never needs to reach the agent's state dir."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(4)
    except OSError:
        sock.close()
        raise
    return sock.detach()


async def connect_while_alive(vm: VmProcess, qemu_log: Path) -> QmpSession:
    """The QMP session of a QEMU just started; QemuError with the tail of its log if it exits first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not vm.alive() and vm.popen is not None and vm.popen.poll() is not None:
            tail = qemu_log.read_text(errors="replace").strip().splitlines()[-3:]
            raise QemuError(f"QEMU for VM {vm.spec.name!r} exited at start: {' / '.join(tail)}",
                            hint=f"See {qemu_log}.")
        try:
            return await QmpSession.connect(vm.paths.qmp_socket, timeout_s=0.5)
        except QemuError:
            continue
    raise QemuError(f"QEMU for VM {vm.spec.name!r} did not answer on QMP within {START_TIMEOUT_S:g} s.",
                    hint=f"See {qemu_log}.")


async def wait_exit(vm: VmProcess, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while vm.alive():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def kill(vm: VmProcess) -> None:
    if vm.pid is not None and vm.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(vm.pid, signal.SIGKILL)
        await wait_exit(vm, KILL_WAIT_S)


async def runtime_view(vm: VmProcess, incoming_migration: int | None) -> VmRuntime:
    """What the agent reports for the VM: powered off (or suspended, with its saved state), or the
    live QEMU's run state, CPU time, memory and any I/O error."""
    rt = VmRuntime(name=vm.spec.name, uuid=vm.spec.uuid, power_state=PowerState.POWERED_OFF,
                   died=vm.died, exit_reason=vm.exit_reason, incoming_migration=incoming_migration)
    if vm.pid is None:
        state = saved_state(vm.paths)
        if state is not None:
            rt.power_state, rt.died = PowerState.SUSPENDED, False
            with contextlib.suppress(OSError):
                rt.suspend_state_bytes = state.stat().st_size
        return rt
    rt.pid, rt.died, rt.exit_reason = vm.pid, False, None
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(vm.pid)
        times = proc.cpu_times()
        rt.cpu_seconds = round(times.user + times.system, 3)
        rt.rss_mib = round(proc.memory_info().rss / (1 << 20), 1)
    rt.power_state = PowerState.UNKNOWN
    if vm.qmp is not None:
        try:
            status = await asyncio.wait_for(vm.qmp.query_status(), timeout=STATUS_TIMEOUT_S)
            rt.qemu_status = status.status
            rt.power_state = PowerState.POWERED_ON if status.running else PowerState.PAUSED
            if status.status == QemuRunState.IO_ERROR:
                rt.io_error = io_error_message(vm)
            elif vm.storage_lost is not None:
                rt.io_error = vm.storage_lost
        except (QemuError, TimeoutError) as exc:
            log.warning("query-status of VM %s failed: %s", vm.spec.name, exc)
    return rt


def io_error_message(vm: VmProcess) -> str:
    """The agent's account of a VM paused on a disk error (werror/rerror=stop), from QEMU's
    last BLOCK_IO_ERROR; logged once per event."""
    assert vm.qmp is not None
    events = vm.qmp.events_named("BLOCK_IO_ERROR")
    if not events:
        return "paused on a disk I/O error"
    last = events[-1]
    d = last.data
    disk = d.get("device") or d.get("node-name")
    message = (f"paused on an I/O error: {d.get('operation', '?')} of {disk} failed "
               f"({d.get('reason', 'no reason given')})")
    if vm.io_error_seq != last.seq:
        vm.io_error_seq = last.seq
        log.error("VM %s %s", vm.spec.name, message)
    return message


def ram_resident_bytes(vm: VmProcess) -> int | None:
    """How much of the guest's RAM QEMU holds in memory, i.e. what the guest ever touched: the
    resident size of QEMU's anonymous mapping as large as the guest's RAM (QEMU's whole RSS,
    which adds its own memory and TCG's code cache, if that mapping is not found)."""
    if vm.pid is None or not vm.alive():
        return None
    ram_bytes = vm.spec.memory_mib * 2**20
    try:
        proc = psutil.Process(vm.pid)
        for mapping in proc.memory_maps(grouped=False):
            if mapping.size == ram_bytes and "w" in mapping.perms:
                return int(mapping.rss)
        return int(proc.memory_info().rss)
    except psutil.Error:
        return None


def ram_zero_fraction(vm: VmProcess) -> float | None:
    """Share of the guest's RAM that holds only zeros, sampled from QEMU's memory (None when
    the VM does not run or its RAM mapping is not found)."""
    if vm.pid is None or not vm.alive():
        return None
    try:
        return guest_ram_zero_fraction(vm.pid, vm.spec.memory_mib * 2**20)
    except OSError as exc:
        log.warning("sampling the memory of VM %s failed: %s", vm.spec.name, exc)
        return None
