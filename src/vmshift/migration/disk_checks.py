"""Checks of a disk move (Storage vMotion, cold, suspended), one result each, in a fixed order. No I/O.

They reuse the live checks where a question is the same (hosts connected, CPU, networks, the
concurrency limit) and add the disk questions: does the target host see the target datastore, is
there room for the copies, can the format be written.
"""

from __future__ import annotations

from vmshift.migration.checks import (
    ERR,
    OK,
    HostView,
    MigrationLoad,
    VmView,
    _cpu,
    _hosts,
    _load,
    _networks,
    _r,
)
from vmshift.model.enums import DiskFormat, MigrationKind
from vmshift.model.migration import CheckId, CheckReport, CheckResult


def _kind(kind: MigrationKind, vm: VmView) -> CheckResult:
    return _r(CheckId.KIND, OK, f"VM '{vm.name}' is {vm.power_state.value}: a {kind.value} move.")


def _target_datastore(dst: HostView, datastore: str) -> CheckResult:
    if any(d.name == datastore for d in dst.facts.datastores):
        return _r(CheckId.TARGET_DATASTORE, OK, f"Host {dst.name} sees datastore '{datastore}'.")
    seen = ", ".join(sorted(d.name for d in dst.facts.datastores)) or "none"
    return _r(CheckId.TARGET_DATASTORE, ERR, f"Host {dst.name} does not see datastore '{datastore}'.",
              f"Choose a datastore of {dst.name} ({seen}).")


def _space(dst: HostView, datastore: str, need_mib: int) -> CheckResult:
    info = next((d for d in dst.facts.datastores if d.name == datastore), None)
    if info is None:
        return _r(CheckId.DATASTORE_SPACE, ERR, f"The free space of datastore '{datastore}' is unknown.",
                  "Choose a datastore the target host sees.")
    if need_mib <= info.free_mib:
        return _r(CheckId.DATASTORE_SPACE, OK,
                  f"Datastore '{datastore}' has {info.free_mib} MiB free for {need_mib} MiB of copies.")
    return _r(CheckId.DATASTORE_SPACE, ERR,
              f"Datastore '{datastore}' has {info.free_mib} MiB free but the copies may need {need_mib} MiB "
              "(each disk's full size).",
              "Free space on it, or choose a larger datastore.")


def _format(disk_format: DiskFormat | None) -> CheckResult:
    if disk_format is None:
        return _r(CheckId.DISK_FORMAT, OK, "Each copy keeps its disk's format.")
    return _r(CheckId.DISK_FORMAT, OK, f"The copies are written as {disk_format.value}.")


def run_disk_checks(
    kind: MigrationKind,
    vm: VmView,
    source: HostView,
    target: HostView,
    *,
    datastore: str,
    need_mib: int,
    disk_format: DiskFormat | None = None,
    load: MigrationLoad | None = None,
) -> CheckReport:
    """Every check of a disk move. A move to another host also checks what the VM needs to run there."""
    results = [_kind(kind, vm)]
    hosts = [r for r in _hosts(vm, source, target) if r.check is not CheckId.DIFFERENT_HOST]
    if source.name == target.name:
        hosts = [r for r in hosts if r.check is CheckId.SOURCE_CONNECTED]
    results += hosts
    if source.name != target.name:
        results += [*_cpu(vm, target), _networks(vm, target)]
    results += [
        _target_datastore(target, datastore),
        _space(target, datastore, need_mib),
        _format(disk_format),
        _load(source, target, load or MigrationLoad()),
    ]
    return CheckReport(results=results)
