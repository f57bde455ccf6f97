"""Suspend and resume on one host: a VM's RAM and device state to ``DATASTORE/NAME/suspended.state``
and back (the QMP steps are in ``qemu/savevm.py``; docs/suspend.md says what users see).

The supervisor calls these with the VM's lock held. The rules they keep:

- A save goes to ``suspended.state.partial`` and becomes ``suspended.state`` (fsync, rename) only
  when QEMU reports it complete. Any failure removes the partial file and runs the vCPUs again if
  they ran before, so a VM either runs as before or is suspended; never both, never half.
- A suspended VM is one with no QEMU and a ``suspended.state``. Resuming renames the file to
  ``suspended.state.loaded`` once QEMU loaded it and before the vCPUs run, and removes it after:
  a state file that may be older than the VM's disks is never offered for a resume again. A load that
  fails leaves the file where it was, and the VM stays suspended.
- ``run_dir/suspending.json`` marks a save in progress until QEMU exited, so an agent that restarts
  in the middle finishes it (state on disk: QEMU quits) or undoes it (partial file removed, vCPUs on).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vmshift.errors import ConflictError, QemuError
from vmshift.migration.samples import QemuMigrationStatus
from vmshift.model.enums import MIGRATION_RUN_STATES, PowerAction, QemuRunState
from vmshift.model.suspend import SuspendPhase, SuspendProgress, SuspendResult, state_timeout_s
from vmshift.model.vm import VmRuntime, VmSpec
from vmshift.qemu.cmdline import VmPaths
from vmshift.qemu.migration_qmp import announce_self
from vmshift.qemu.qmp import QmpSession
from vmshift.qemu.savevm import StateFileSettings, StateTransfer, cancel_quietly, load_from_file, save_to_file

log = logging.getLogger(__name__)

MIB = 1 << 20
MARK_FILE = "suspending.json"


@dataclass(frozen=True)
class SuspendSettings:
    state_file: StateFileSettings = field(default_factory=StateFileSettings)

    def timeout_s(self, memory_bytes: int) -> float:
        return state_timeout_s(memory_bytes)


def partial_path(paths: VmPaths) -> Path:
    return paths.suspend_state.with_name(paths.suspend_state.name + ".partial")


def loaded_path(paths: VmPaths) -> Path:
    return paths.suspend_state.with_name(paths.suspend_state.name + ".loaded")


def saved_state(paths: VmPaths) -> Path | None:
    """The VM's state file, if it has one (then, without a QEMU, the VM is suspended)."""
    return paths.suspend_state if paths.suspend_state.is_file() else None


def supports_direct_io(directory: Path) -> bool:
    """Whether files in ``directory`` open with O_DIRECT (tmpfs, for one, refuses it). A folder that
    takes no new file at all says False too: QEMU's own attempt then reports why."""
    probe = directory / f".direct-io-probe.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            log.warning("cannot create a file in %s: %s", directory, exc)
        return False
    os.close(fd)
    probe.unlink(missing_ok=True)
    return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(partial: Path, final: Path) -> None:
    """Make the finished file durable under its final name."""
    fd = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    partial.rename(final)
    _fsync_dir(final.parent)


def _settings_for(paths: VmPaths, settings: SuspendSettings) -> StateFileSettings:
    s = settings.state_file
    if s.direct_io and not supports_direct_io(paths.vm_dir):
        log.info("datastore folder %s refuses O_DIRECT: the state file goes through the page cache",
                 paths.vm_dir)
        s = StateFileSettings(multifd_channels=s.multifd_channels, direct_io=False,
                              poll_interval_s=s.poll_interval_s)
    return s


@dataclass(frozen=True)
class SaveOutcome:
    transfer: StateTransfer
    direct_io: bool

    def result(self, runtime: VmRuntime, paths: VmPaths, spec: VmSpec, total_s: float) -> SuspendResult:
        st = paths.suspend_state.stat()
        return SuspendResult(
            runtime=runtime, state_file=str(paths.suspend_state), file_bytes=st.st_size,
            allocated_bytes=st.st_blocks * 512, memory_bytes=spec.memory_mib * MIB,
            written_bytes=self.transfer.written_bytes, save_s=round(self.transfer.elapsed_s, 3),
            write_bps=round(self.transfer.rate_bps), total_s=round(total_s, 3), direct_io=self.direct_io,
        )


ProgressSink = Callable[[SuspendProgress], None]


def _progress(spec: VmSpec, phase: SuspendPhase, t: StateTransfer | None, error: str | None = None,
              ) -> SuspendProgress:
    return SuspendProgress(
        vm=spec.name, phase=phase,
        percent=100 if phase is SuspendPhase.DONE else (t.percent if t is not None else 0),
        ram_bytes=t.total_bytes if t is not None else spec.memory_mib * MIB,
        written_bytes=t.written_bytes if t is not None else 0,
        elapsed_s=round(t.elapsed_s, 3) if t is not None else 0.0,
        rate_bps=round(t.rate_bps) if t is not None else 0.0, error=error,
    )


async def save_state(qmp: QmpSession, paths: VmPaths, spec: VmSpec, settings: SuspendSettings,
                     on_progress: ProgressSink, create_file: Callable[[Path], None] | None = None,
                     ) -> SaveOutcome:
    """Stop the vCPUs and write the VM's state to its folder. On return the state file is durable
    and QEMU (in ``postmigrate``) must exit; on any error the VM runs again as before.

    ``create_file`` makes the empty file QEMU writes into (a confined QEMU cannot create files in
    the VM's folder, see agent/qemu_user.py)."""
    status = await qmp.query_status()
    if status.state in MIGRATION_RUN_STATES:
        raise ConflictError(f"VM {spec.name!r} belongs to a live migration (QEMU state {status.status!r}), "
                            "so it cannot be suspended now.",
                            hint="Let the migration finish or roll it back, then suspend the VM.")
    partial, mark = partial_path(paths), paths.run_dir / MARK_FILE
    state_settings = _settings_for(paths, settings)
    last: StateTransfer | None = None

    def seen(t: StateTransfer) -> None:
        nonlocal last
        last = t
        on_progress(_progress(spec, SuspendPhase.SAVING, t))

    mark.write_text(json.dumps({"was_running": status.running}))
    for stale in (partial, loaded_path(paths)):
        stale.unlink(missing_ok=True)
    try:
        if create_file is not None:
            try:
                create_file(partial)
            except OSError as exc:
                raise QemuError(f"The state file of VM {spec.name!r} cannot be created in {paths.vm_dir} "
                                f"({exc.strerror}).",
                                hint=f"The VM runs on as before; check that {paths.vm_dir} is writable and "
                                     "has room for the VM's memory.") from exc
        on_progress(_progress(spec, SuspendPhase.STOPPING, None))
        await qmp.stop()
        try:
            transfer = await save_to_file(qmp, partial, state_settings, timeout_s=settings.timeout_s(
                spec.memory_mib * MIB), on_progress=seen)
            why = None if transfer.status is QemuMigrationStatus.COMPLETED else (
                transfer.error or transfer.status.value)
        except QemuError as exc:
            why = exc.message
        if why is not None:
            raise QemuError(f"QEMU could not save the state of VM {spec.name!r}: {why}",
                            hint=f"The VM runs on as before; check that {paths.vm_dir} is writable and "
                                 "has room for the VM's memory, and see the VM's QEMU log.")
        on_progress(_progress(spec, SuspendPhase.SYNCING, transfer))
        await asyncio.to_thread(_publish, partial, paths.suspend_state)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        if status.running:
            with contextlib.suppress(QemuError):
                await qmp.cont()
        mark.unlink(missing_ok=True)
        on_progress(_progress(spec, SuspendPhase.FAILED, last, error=str(exc)))
        raise
    on_progress(_progress(spec, SuspendPhase.QUITTING, transfer))
    return SaveOutcome(transfer, state_settings.direct_io)


def saved_and_stopped(paths: VmPaths, spec: VmSpec, on_progress: ProgressSink,
                      outcome: SaveOutcome) -> None:
    """QEMU exited after a save: the VM is suspended."""
    (paths.run_dir / MARK_FILE).unlink(missing_ok=True)
    on_progress(_progress(spec, SuspendPhase.DONE, outcome.transfer))
    log.info("suspended VM %s: %d bytes written in %.2f s", spec.name, outcome.transfer.written_bytes,
             outcome.transfer.elapsed_s)


async def restore_state(qmp: QmpSession, paths: VmPaths, spec: VmSpec, settings: SuspendSettings) -> None:
    """Load the state file into a QEMU started with ``-S -incoming defer`` and run the guest.

    Raises (with the file kept, the caller stops QEMU) when the load fails; the file is set aside
    before the vCPUs run and removed once they do."""
    state = paths.suspend_state
    transfer = await load_from_file(qmp, state, _settings_for(paths, settings),
                                    timeout_s=settings.timeout_s(spec.memory_mib * MIB))
    if transfer.status is not QemuMigrationStatus.COMPLETED:
        raise QemuError(
            f"QEMU could not load the saved state of VM {spec.name!r} "
            f"({transfer.error or transfer.status.value}); the VM stays suspended with its state file kept.",
            hint=f"See the VM's QEMU log. 'vmshift vm stop {spec.name}' discards the saved state "
                 "(the guest then boots afresh at the next start).")
    loaded = loaded_path(paths)
    state.rename(loaded)
    try:
        await qmp.cont()
    except BaseException:
        loaded.rename(state)
        raise
    with contextlib.suppress(QemuError):  # the MAC did not move, but switches may have aged it out
        await announce_self(qmp)
    try:
        loaded.unlink()
        _fsync_dir(loaded.parent)
    except OSError as exc:  # harmless: no resume reads a .loaded file; the next suspend removes it
        log.warning("VM %s resumed, but its used state file %s stays: %s", spec.name, loaded, exc)
    log.info("resumed VM %s from its saved state (%d bytes read in %.2f s)", spec.name,
             transfer.written_bytes, transfer.elapsed_s)


def discard_state(paths: VmPaths, spec: VmSpec) -> None:
    """Power off a suspended VM: its saved state goes (vSphere does the same)."""
    paths.suspend_state.unlink(missing_ok=True)
    _fsync_dir(paths.vm_dir)
    log.info("discarded the saved state of suspended VM %s (powered off)", spec.name)


def refuse_on_suspended(name: str, action: PowerAction) -> ConflictError:
    """Why ``action`` does not apply to a suspended VM."""
    return ConflictError(
        f"VM {name!r} is suspended (no QEMU runs; its state is saved), so it cannot {action.value}.",
        hint=f"Resume it with 'vmshift vm resume {name}' (or start), or power it off with "
             f"'vmshift vm stop {name}', which discards the saved state.")


_HARDWARE = ("cpus", "memory_mib", "cpu_model", "machine_type")


def refuse_hardware_change(old: VmSpec, new: VmSpec) -> None:
    """A suspended VM's state fits only the hardware that saved it: QEMU 10.0.2 loading a 1 GiB
    guest's file into 256 MiB hung instead of failing. ConflictError if ``new`` changes it."""
    changed = [f for f in _HARDWARE if getattr(old, f) != getattr(new, f)]
    if [n.mac for n in old.nics] != [n.mac for n in new.nics]:
        changed.append("NICs")
    if len(old.disks) != len(new.disks):
        changed.append("disks")
    if changed:
        raise ConflictError(
            f"VM {old.name!r} is suspended, so its {', '.join(changed)} cannot change: the saved state "
            "would no longer fit.",
            hint=f"Resume it first, or power it off ('vmshift vm stop {old.name}' discards the saved state).")


async def recover(qmp: QmpSession, paths: VmPaths, spec: VmSpec) -> bool:
    """At agent start, for a live QEMU: finish or undo a save or a load the agent was in the middle
    of. True means QEMU must exit (the VM is then suspended, its state file complete)."""
    mark = paths.run_dir / MARK_FILE
    state = saved_state(paths)
    status = await qmp.query_status()
    if state is not None and status.state in (QemuRunState.POSTMIGRATE, QemuRunState.INMIGRATE):
        log.warning("VM %s: finishing an interrupted %s (QEMU state %s): QEMU exits, the VM is suspended",
                    spec.name, "suspend" if mark.exists() else "resume", status.status)
        return True
    if not mark.exists():
        return False
    was_running = bool(json.loads(mark.read_text() or "{}").get("was_running"))
    log.warning("VM %s: undoing an interrupted suspend (QEMU state %s)", spec.name, status.status)
    await cancel_quietly(qmp)
    partial_path(paths).unlink(missing_ok=True)
    if was_running and not (await qmp.query_status()).running:
        await qmp.cont()
    mark.unlink(missing_ok=True)
    return False
