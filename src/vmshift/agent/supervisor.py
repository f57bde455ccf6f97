"""Owns the QEMU processes of this host: start, stop, shutdown, reset, re-attach, death detection.

QEMU runs in its own session so it outlives the agent. ``run_dir/running.json`` records a VM the
agent started (pid); when the process is found gone without the agent having stopped it, the
record is replaced by ``exit.json`` with ``died: true``, which survives agent restarts until the
next start or delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import subprocess
import time
from collections.abc import Awaitable, Callable

from vmshift.agent import serial_log, vm_process
from vmshift.agent.config import AgentConfig
from vmshift.agent.qemu_user import QemuIdentity, prepare_vm_files
from vmshift.agent.qemu_user import resolve as resolve_qemu_user
from vmshift.agent.suspend import (
    SuspendSettings,
    discard_state,
    recover,
    refuse_hardware_change,
    refuse_on_suspended,
    restore_state,
    save_state,
    saved_and_stopped,
    saved_state,
)
from vmshift.agent.taps import create_tap, delete_tap, open_tap
from vmshift.agent.vm_process import VmProcess
from vmshift.agent.vmfiles import VmFiles
from vmshift.errors import ConflictError, NotFoundError, QemuError, VmshiftError
from vmshift.model.enums import MIGRATION_RUN_STATES, Accelerator, PowerAction, QemuRunState
from vmshift.model.suspend import SuspendProgress, SuspendResult
from vmshift.model.vm import VmRuntime, VmSpec
from vmshift.qemu.cmdline import PassedFds, VmPaths, build_qemu_argv, tap_name
from vmshift.qemu.qmp import QmpSession

log = logging.getLogger(__name__)

RUNNING_FILE = "running.json"
EXIT_FILE = "exit.json"
QEMU_LOG = "qemu.log"
QUIT_TIMEOUT_S = 5.0
POWER_BUTTON_REPEAT_S = 5.0
#: SHUTDOWN reasons after which QEMU (``-action shutdown=pause``) waits paused for the agent to end it
GUEST_ENDINGS = ("guest-shutdown", "guest-panic")
QEMU_SHUTDOWN_STATUS = "shutdown"

_NO_RESUME_BECAUSE: dict[str, str] = {  # why each of MIGRATION_RUN_STATES forbids a plain resume
    QemuRunState.INMIGRATE: "waits for or loads an incoming live migration",
    QemuRunState.FINISH_MIGRATE: "is in the last step of an outgoing live migration",
    QemuRunState.POSTMIGRATE: "has sent its whole state to another host",
}


async def _nothing_to_publish() -> None:
    return None


class Supervisor:
    def __init__(self, config: AgentConfig, files: VmFiles, accelerator: Accelerator,
                 qemu_identity: QemuIdentity | None = None) -> None:
        self.config = config
        self.files = files
        self.accelerator = accelerator
        self.qemu_identity = qemu_identity or resolve_qemu_user(config.qemu_user, accelerator)
        self.serial = serial_log.SerialLogs(config.serial_log_cap_bytes)
        self._vms: dict[str, VmProcess] = {}
        # publish the VMs' states on the host stream now (agent/host_stream.py; set by the app)
        self.publish_now: Callable[[], Awaitable[None]] = _nothing_to_publish
        self.suspend_settings = SuspendSettings()
        self.suspends: dict[str, SuspendProgress] = {}  # the last suspend of each VM (GET .../suspend)
        # VM name -> id of the cold or suspended move copying its files: it may not start or be deleted
        self.moving: dict[str, int] = {}

    # ----- bookkeeping -------------------------------------------------------------------------
    def _entry(self, name: str) -> VmProcess:
        entry = self._vms.get(name)
        spec = self.files.load_spec(name)
        if entry is None or entry.spec.uuid != spec.uuid:
            entry = VmProcess(spec=spec, paths=self.files.paths(spec))
            self._vms[name] = entry
        else:
            entry.spec, entry.paths = spec, self.files.paths(spec)
        return entry

    async def attach_all(self) -> None:
        """At agent start: re-attach to live QEMUs, mark dead ones, clean their taps."""
        for name in self.files.registered_names():
            try:
                vm = self._entry(name)
            except NotFoundError as exc:
                log.warning("skipping VM %s: %s", name, exc)
                continue
            running = vm.paths.run_dir / RUNNING_FILE
            exited = vm.paths.run_dir / EXIT_FILE
            if exited.exists():
                with contextlib.suppress(OSError, ValueError):
                    data = json.loads(exited.read_text())
                    vm.died, vm.exit_reason = bool(data.get("died")), data.get("exit_reason")
            if not running.exists():
                continue
            data = json.loads(running.read_text())
            vm.pid, vm.taps = int(data["pid"]), list(data.get("taps", []))
            if vm.alive():
                try:
                    vm.qmp = await QmpSession.connect(vm.paths.qmp_socket, timeout_s=5.0)
                    log.info("re-attached to VM %s (pid %d)", name, vm.pid)
                    if await recover(vm.qmp, vm.paths, vm.spec):  # a suspend or resume was cut short
                        await self._hard_stop(vm, reason="suspended")
                    else:
                        await self._note_ended_unseen(vm)
                except QemuError as exc:
                    log.warning("VM %s runs (pid %d) but QMP is unreachable: %s", name, vm.pid, exc)
            else:
                await self._handle_exit(vm)

    async def _handle_exit(
        self, vm: VmProcess, *, stopped_by_us: bool = False, override_reason: str | None = None
    ) -> None:
        """The process is gone: decide whether it died, release taps and QMP, persist the outcome."""
        reason = None
        if vm.qmp is not None:
            shutdowns = vm.qmp.events_named("SHUTDOWN")
            if shutdowns:
                reason = str(shutdowns[-1].data.get("reason", "shutdown"))
            await vm.qmp.close()
            vm.qmp = None
        vm.died = not stopped_by_us and reason != "guest-shutdown"
        vm.exit_reason = override_reason or reason or ("stopped" if stopped_by_us else "process vanished")
        for tap in vm.taps:
            await delete_tap(tap)
        try:
            await self.files.detach_luns(vm.spec)
        except VmshiftError as exc:  # the storage role is away: it still names this host
            log.warning("VM %s: could not release its LUNs: %s", vm.spec.name, exc)
        vm.pid, vm.popen, vm.taps, vm.ended_unseen = None, None, [], None
        (vm.paths.run_dir / RUNNING_FILE).unlink(missing_ok=True)
        outcome = {"died": vm.died, "exit_reason": vm.exit_reason}
        (vm.paths.run_dir / EXIT_FILE).write_text(json.dumps(outcome))
        if vm.died:
            log.warning("VM %s died (%s)", vm.spec.name, vm.exit_reason)

    def _guest_ended(self, vm: VmProcess) -> str | None:
        """The reason the guest powered off or panicked, if it did: its QEMU waits paused to be ended."""
        if vm.ended_unseen is not None:
            return vm.ended_unseen
        if vm.qmp is None:
            return None
        for event in reversed(vm.qmp.events_named("SHUTDOWN")):
            reason = str(event.data.get("reason", ""))
            if reason in GUEST_ENDINGS:
                return reason
        return None

    async def _note_ended_unseen(self, vm: VmProcess) -> None:
        """After a (re)connect: a guest that powered off while nobody listened left no event."""
        if vm.qmp is not None:
            with contextlib.suppress(QemuError):
                if (await vm.qmp.query_status()).status == QEMU_SHUTDOWN_STATUS:
                    vm.ended_unseen = GUEST_ENDINGS[0]

    async def _end_guest_ended(self, vm: VmProcess, reason: str) -> None:
        """The guest powered off (or panicked) and QEMU paused: keep its last serial output, then quit
        QEMU. A power-off is a normal stop; a panic counts as the VM dying."""
        with contextlib.suppress(QemuError, OSError):
            await self._drain_serial(vm)
        if vm.qmp is not None:
            with contextlib.suppress(QemuError, TimeoutError):
                await asyncio.wait_for(vm.qmp.quit(), timeout=QUIT_TIMEOUT_S)
        if not await vm_process.wait_exit(vm, QUIT_TIMEOUT_S):
            await vm_process.kill(vm)
        vm.ended_unseen = None
        await self._handle_exit(vm, stopped_by_us=reason == GUEST_ENDINGS[0], override_reason=reason)

    async def _settle(self, vm: VmProcess) -> None:
        """With the VM's lock held: record an exit, or end a QEMU whose guest powered off."""
        if vm.pid is None:
            return
        if not vm.alive():
            await self._handle_exit(vm)
        elif (ended := self._guest_ended(vm)) is not None:
            await self._end_guest_ended(vm, ended)

    async def refresh(self) -> None:
        """Called periodically: notice processes that exited since the last look, end QEMUs whose
        guest powered off, and reconnect QMP to live QEMUs whose connection broke (or never came up
        at re-attach)."""
        for vm in list(self._vms.values()):
            if vm.pid is None or vm.lock.locked():
                continue
            async with vm.lock:
                await self._settle(vm)
                if vm.pid is not None and (vm.qmp is None or not vm.qmp.connected):
                    await self._reconnect_qmp(vm)

    async def _reconnect_qmp(self, vm: VmProcess) -> None:
        """QEMU's monitor takes one client and listens again once it hangs up: connect anew, keeping
        the events seen so far (a SHUTDOWN among them still explains a later exit)."""
        old = vm.qmp
        try:
            new = await QmpSession.connect(vm.paths.qmp_socket, timeout_s=1.0)
        except QemuError as exc:
            if not vm.qmp_lost:
                log.warning("VM %s runs (pid %s) but its QMP connection is lost; retrying: %s",
                            vm.spec.name, vm.pid, exc)
            vm.qmp_lost = True
            return
        if old is not None:
            new.adopt_events(old)
            await old.close()
        vm.qmp, vm.qmp_lost = new, False
        log.info("reconnected QMP to VM %s (pid %s)", vm.spec.name, vm.pid)
        await self._note_ended_unseen(vm)

    # ----- views -------------------------------------------------------------------------------
    async def runtime(self, name: str) -> VmRuntime:
        vm = self._entry(name)
        if vm.pid is not None and not vm.lock.locked() and (not vm.alive() or self._guest_ended(vm)):
            async with vm.lock:
                await self._settle(vm)
        return await self._view(vm)

    async def _view(self, vm: VmProcess) -> VmRuntime:
        return await vm_process.runtime_view(vm, self.files.incoming_migration(vm.spec.name))

    async def list_vms(self) -> list[VmRuntime]:
        """Every VM of this host, including receiving QEMUs of live migrations: the server must see
        each QEMU to prove that a VM runs once. Those carry ``incoming_migration``."""
        out = []
        for name in self.files.registered_names():
            with contextlib.suppress(NotFoundError):
                out.append(await self.runtime(name))
        return out

    def guest_ram_resident_bytes(self, name: str) -> int | None:
        """What of the guest's RAM its QEMU holds in memory (agent/vm_process.py)."""
        return vm_process.ram_resident_bytes(self._entry(name))

    def guest_ram_zero_fraction(self, name: str) -> float | None:
        """The share of the guest's RAM that holds only zeros (agent/vm_process.py)."""
        return vm_process.ram_zero_fraction(self._entry(name))

    async def serial_tail(self, name: str, tail_bytes: int) -> str:
        """The last ``tail_bytes`` of the serial log, with what the guest wrote until now."""
        vm = self._entry(name)
        await self._drain_serial(vm)
        data = await self.serial.tail(name, vm.paths, max(0, tail_bytes))
        return data.decode(errors="replace")

    async def _drain_serial(self, vm: VmProcess) -> None:
        if vm.pid is not None and vm.qmp is not None and vm.qmp.connected:
            await self.serial.drain(vm.spec.name, vm.qmp, vm.paths)

    async def drain_serial_all(self) -> None:
        """Called every drain interval: move each running guest's console output into its log."""
        for vm in list(self._vms.values()):
            try:
                await self._drain_serial(vm)
            except OSError as exc:  # a full or vanished datastore: the ring keeps the rest
                log.warning("writing the serial log of VM %s failed: %s", vm.spec.name, exc)

    async def move_serial_log(self, name: str, old: VmPaths, new: VmPaths) -> bool:
        """The VM's home moved while it runs (Storage vMotion): bring its log to the new folder.
        False when its QEMU writes the log itself (started by an older agent)."""
        return await self.serial.move(name, self.qmp_session(name), old, new)

    # ----- define / delete ---------------------------------------------------------------------
    async def define(self, spec: VmSpec) -> VmRuntime:
        current = self._vms.get(spec.name)
        if current is not None and current.alive() and current.spec != spec:
            raise ConflictError(f"VM {spec.name!r} is running; its definition cannot change now.",
                                hint="Power it off first.")
        if current is not None and current.pid is None and saved_state(current.paths) is not None:
            refuse_hardware_change(current.spec, spec)
        await self.files.define(spec, self.config.networks)
        return await self.runtime(spec.name)

    async def delete(self, name: str) -> None:
        self._refuse_if_moving(name, "be deleted")
        vm = self._entry(name)
        async with vm.lock:
            await self._settle(vm)
            if vm.alive():
                raise ConflictError(f"VM {name!r} is running and cannot be deleted.",
                                    hint="Stop or shut it down first.")
            if vm.pid is not None:
                await self._handle_exit(vm)
            await self.files.remove_luns(vm.spec)
            self.files.remove(vm.spec)
            self._vms.pop(name, None)

    async def unregister_stopped(self, name: str) -> None:
        """Forget a VM that runs no QEMU here, keeping its files (a cold move registered it elsewhere)."""
        vm = self._entry(name)
        async with vm.lock:
            await self._settle(vm)
            if vm.alive():
                raise ConflictError(f"VM {name!r} is running here and cannot be unregistered.",
                                    hint="Stop it first, or move it live.")
            if vm.pid is not None:
                await self._handle_exit(vm, stopped_by_us=True)
            self.files.unregister(name)
            self._vms.pop(name, None)

    async def stop_and_unregister(self, name: str) -> None:
        """Migration roles: stop the VM's QEMU (if any) and forget the VM here, keeping its files.

        Used by the source after a completed migration and by the target on rollback; the VM's
        folder and disks are on shared storage and belong to whichever host runs the VM now.
        """
        try:
            vm = self._entry(name)
        except NotFoundError:
            self.files.unregister(name)
            self._vms.pop(name, None)
            return
        async with vm.lock:
            if vm.alive():
                await self._hard_stop(vm, reason="migrated away or rolled back")
            elif vm.pid is not None:
                await self._handle_exit(vm, stopped_by_us=True)
            self.files.unregister(name)
            self.files.drop_host_folder(vm.spec)
            self._vms.pop(name, None)

    def is_alive(self, name: str) -> bool:
        try:
            return self._entry(name).alive()
        except NotFoundError:
            return False

    # ----- power -------------------------------------------------------------------------------
    async def power(self, name: str, action: PowerAction, timeout_s: float = 30.0) -> VmRuntime:
        vm = self._entry(name)
        async with vm.lock:
            await self._settle(vm)
            running = vm.alive()
            if not running and saved_state(vm.paths) is not None:
                await self._power_suspended(vm, action)
            elif action is PowerAction.START:
                if not running:
                    await self._start(vm)
            elif action is PowerAction.STOP:
                if running:
                    await self._hard_stop(vm)
            elif action is PowerAction.SHUTDOWN:
                if running:
                    await self._shutdown(vm, timeout_s)
            elif action is PowerAction.RESET:
                if not running:
                    raise ConflictError(f"VM {name!r} is not running, so it cannot be reset.",
                                        hint="Start it instead.")
                await self._qmp(vm).system_reset()
            elif action is PowerAction.PAUSE:
                if not running:
                    raise ConflictError(f"VM {name!r} is not running, so it cannot be paused.",
                                        hint="Nothing to do: it runs no guest code.")
                # In state inmigrate, QMP stop only clears QEMU's autostart: the loaded guest stays paused.
                await self._qmp(vm).stop()
            elif action is PowerAction.RESUME:
                if not running:
                    raise ConflictError(f"VM {name!r} is not running, so it cannot be resumed.",
                                        hint="Start it instead.")
                await self._refuse_migration_resume(vm)
                await self._qmp(vm).cont()
            return await self._view(vm)

    def running_on_iscsi(self) -> dict[str, set[str]]:
        """The VMs running here (not receiving a migration) by the iSCSI datastores of their disks."""
        found: dict[str, set[str]] = {}
        for vm in list(self._vms.values()):
            if not vm.alive() or self.files.is_incoming(vm.spec.name):
                continue
            with contextlib.suppress(NotFoundError):
                for ds, _ in self.files.iscsi_disks(vm.spec):
                    found.setdefault(ds.name, set()).add(vm.spec.name)
        return found

    def mark_storage_lost(self, name: str, reason: str | None) -> None:
        """Note (or, with None, clear) that the VM's iSCSI target stopped answering: its disk
        requests wait for it (agent/storage_watch.py says why QEMU is not paused)."""
        vm = self._vms.get(name)
        if vm is None or vm.storage_lost == reason:
            return
        vm.storage_lost = reason
        if reason is not None:
            log.error("VM %s: %s", name, reason)
        else:
            log.info("VM %s: its iSCSI target answers again", name)

    async def _power_suspended(self, vm: VmProcess, action: PowerAction) -> None:
        """vSphere's rules: power on (or resume) restores the saved state, power off discards it."""
        if action in (PowerAction.START, PowerAction.RESUME):
            await self._start(vm, incoming="defer")
            try:
                await restore_state(self._qmp(vm), vm.paths, vm.spec, self.suspend_settings)
            except BaseException:
                await self._hard_stop(vm, reason="resume failed; the saved state is kept")
                raise
        elif action is PowerAction.STOP:
            self._refuse_if_moving(vm.spec.name, "be powered off")  # the move copies the state file
            discard_state(vm.paths, vm.spec)
        else:
            raise refuse_on_suspended(vm.spec.name, action)

    async def suspend(self, name: str) -> SuspendResult:
        """Save the running (or paused) VM's state to its folder and stop QEMU (agent/suspend.py)."""
        vm = self._entry(name)
        async with vm.lock:
            await self._settle(vm)
            if not vm.alive():
                if saved_state(vm.paths) is not None:
                    raise ConflictError(f"VM {name!r} is already suspended.", hint="Nothing to do.")
                raise ConflictError(f"VM {name!r} is not running, so it cannot be suspended.",
                                    hint="Start it first.")
            if (incoming := self.files.incoming_migration(name)) is not None:
                raise ConflictError(f"VM {name!r} here receives live migration {incoming}, so it cannot be "
                                    "suspended.", hint="Suspend it once the migration has finished.")
            began = time.monotonic()
            sink = functools.partial(self.suspends.__setitem__, name)
            outcome = await save_state(self._qmp(vm), vm.paths, vm.spec, self.suspend_settings, sink,
                                       create_file=self.qemu_identity.create_file)
            await self._hard_stop(vm, reason="suspended")
            saved_and_stopped(vm.paths, vm.spec, sink, outcome)
            return outcome.result(await self._view(vm), vm.paths, vm.spec, time.monotonic() - began)

    async def _refuse_migration_resume(self, vm: VmProcess) -> None:
        """A plain resume must never run a QEMU that belongs to a live migration: the guest could
        then run on two hosts (QMP cont in ``inmigrate`` even makes QEMU run once the stream loaded)."""
        name = vm.spec.name
        incoming = self.files.incoming_migration(name)
        if incoming is not None:
            raise ConflictError(
                f"VM {name!r} here is the receiving copy of live migration {incoming}, so it cannot be "
                "resumed by a power action.",
                hint="Let the migration finish or roll it back; 'vmshift vm resume' decides which copy runs.")
        status = (await self._qmp(vm).query_status()).status
        if status in MIGRATION_RUN_STATES:
            why = _NO_RESUME_BECAUSE.get(status, "belongs to a live migration")
            raise ConflictError(
                f"VM {name!r} {why} (QEMU state {status!r}), so resuming it here could run it twice.",
                hint="Use 'vmshift vm resume', which checks where the migration left the VM.")

    async def start(self, name: str, *, incoming: str | None = None) -> VmRuntime:
        """Start a VM; with ``incoming`` (e.g. "defer") QEMU waits paused for a migration stream."""
        vm = self._entry(name)
        async with vm.lock:
            await self._settle(vm)
            if vm.alive():
                raise ConflictError(f"VM {name!r} is already running.", hint="Stop it first.")
            if vm.pid is not None:
                await self._handle_exit(vm)
            await self._start(vm, incoming=incoming)
            return await self._view(vm)

    def qmp_session(self, name: str) -> QmpSession:
        """The live QMP session of a running VM (for migration roles); QemuError if there is none."""
        vm = self._entry(name)
        if not vm.alive():
            raise ConflictError(f"VM {name!r} is not running.", hint="Start it first.")
        return self._qmp(vm)

    def _qmp(self, vm: VmProcess) -> QmpSession:
        if vm.qmp is None:
            raise QemuError(f"VM {vm.spec.name!r} runs but the agent has no QMP connection to it.",
                            hint="Stop it (hard) and start it again.")
        return vm.qmp

    def _refuse_if_moving(self, name: str, what: str) -> None:
        if (move := self.moving.get(name)) is not None:
            raise ConflictError(f"VM {name!r} cannot {what} now: move {move} is copying its files.",
                                hint="Wait until the move ends, or cancel it.")

    async def _start(self, vm: VmProcess, incoming: str | None = None) -> None:
        self._refuse_if_moving(vm.spec.name, "start")
        spec, paths, identity = vm.spec, vm.paths, self.qemu_identity
        kernel = self.files.kernel_boot(spec)
        taps = [tap_name(spec.uuid, i) for i in range(len(spec.nics))]
        paths.run_dir.mkdir(parents=True, exist_ok=True)
        paths.vm_dir.mkdir(parents=True, exist_ok=True)
        for stale in (paths.qmp_socket, paths.run_dir / EXIT_FILE):
            stale.unlink(missing_ok=True)
        self.files.ensure_seed(spec)
        if self.files.iscsi_disks(spec):
            # before QEMU opens them: this host becomes the LUNs' read-write holder, or is refused
            # (a receiving QEMU joins its source for the handover of migration `incoming_migration`)
            mid = self.files.incoming_migration(spec.name) if incoming is not None else None
            await self.files.attach_luns(spec, mid)
            vm.paths = paths = self.files.paths(spec)
        prepare_vm_files(identity, paths, kernel, self.files.backing_files(spec))
        serial_log.touch(paths)
        self.serial.forget(spec.name)
        vm.died, vm.exit_reason = False, None
        vm.taps = []
        passed: list[int] = []
        try:
            for nic, tap in zip(spec.nics, taps, strict=True):
                await create_tap(tap, self.config.networks[nic.network], identity.user)
                vm.taps.append(tap)
            qmp_fd = vm_process.listen_unix(paths.qmp_socket)
            passed.append(qmp_fd)
            tap_fds = [open_tap(tap) for tap in taps]
            passed += tap_fds
            argv = build_qemu_argv(spec, paths, accelerator=self.accelerator, taps=taps, kernel_boot=kernel,
                                   incoming=incoming, qemu_binary=self.config.qemu_binary,
                                   fds=PassedFds(qmp=qmp_fd, taps=tap_fds))
            qemu_log = paths.run_dir / QEMU_LOG
            with qemu_log.open("ab") as logf:
                who = identity.user or "root"
                logf.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} as {who}: {' '.join(argv)}\n".encode())
                logf.flush()
                vm.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                            cwd="/", start_new_session=True, close_fds=True,
                                            pass_fds=passed, umask=0o077, **identity.popen_kwargs())
            for fd in passed:
                os.close(fd)
            passed = []
            vm.pid = vm.popen.pid
            (paths.run_dir / RUNNING_FILE).write_text(json.dumps({"pid": vm.pid, "taps": vm.taps}))
            vm.qmp = await vm_process.connect_while_alive(vm, qemu_log)
            status = await vm.qmp.query_status()
            if incoming is None and not status.running:
                raise QemuError(f"VM {spec.name!r} started but QEMU reports status {status.status!r}.",
                                hint=f"See {qemu_log}.")
        except BaseException:
            for fd in passed:
                os.close(fd)
            await vm_process.kill(vm)
            await self._handle_exit(vm, stopped_by_us=True)
            raise
        log.info("started VM %s (pid %d, as %s)", spec.name, vm.pid, identity.user or "root")

    async def _wait_off(self, vm: VmProcess, timeout_s: float) -> bool:
        """Wait until QEMU exited or its guest powered off (QEMU then waits paused)."""
        deadline = time.monotonic() + timeout_s
        while vm.alive() and self._guest_ended(vm) is None:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _hard_stop(self, vm: VmProcess, reason: str = "stopped") -> None:
        with contextlib.suppress(QemuError, OSError):
            await self._drain_serial(vm)  # the guest's last words
        if vm.qmp is not None:
            with contextlib.suppress(QemuError, TimeoutError):
                await asyncio.wait_for(vm.qmp.quit(), timeout=QUIT_TIMEOUT_S)
        if not await vm_process.wait_exit(vm, QUIT_TIMEOUT_S):
            await vm_process.kill(vm)
        await self._handle_exit(vm, stopped_by_us=True, override_reason=reason)

    async def _shutdown(self, vm: VmProcess, timeout_s: float) -> None:
        """Press the ACPI power button, again every few seconds (a guest still booting may miss the
        first press), and stop hard when the guest has not powered off within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        await self._qmp(vm).system_powerdown()
        exited = await self._wait_off(vm, min(POWER_BUTTON_REPEAT_S, timeout_s))
        while not exited and (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(QemuError):  # QEMU may be on its way out already
                await self._qmp(vm).system_powerdown()
            exited = await self._wait_off(vm, min(POWER_BUTTON_REPEAT_S, left))
        if exited and (ended := self._guest_ended(vm)) is not None and vm.alive():
            await self._end_guest_ended(vm, ended)
        elif exited:
            await self._handle_exit(vm, stopped_by_us=True)
        else:
            log.info("VM %s did not shut down within %g s; stopping it hard", vm.spec.name, timeout_s)
            await self._hard_stop(vm, reason=f"shutdown timed out after {timeout_s:g} s; stopped hard")

    async def close(self) -> None:
        """Agent exit: drop QMP sessions, leave the VMs running."""
        for vm in self._vms.values():
            if vm.qmp is not None:
                await vm.qmp.close()
                vm.qmp = None
