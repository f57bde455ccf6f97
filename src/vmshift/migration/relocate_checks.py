"""Checks of a relocate (shared-nothing: host and datastore change together). Pure, no I/O.

A relocate is a live migration whose disks move too, so it runs every live check except the one
that asks for shared storage (DATASTORES: the target need not see the VM's datastores, since its
disks are copied); in that place come the disk questions of a disk move: the kind, does the target
host see the target datastore, is there room for the copies, can the format be written.
"""

from __future__ import annotations

from vmshift.migration.checks import HostView, VmView
from vmshift.migration.disk_checks import _format, _kind, _space, _target_datastore
from vmshift.model.enums import DiskFormat, MigrationKind
from vmshift.model.migration import CheckId, CheckReport, CheckResult


def relocate_report(live: CheckReport, vm: VmView, target: HostView, *, datastore: str, need_mib: int,
                    disk_format: DiskFormat | None = None) -> CheckReport:
    """The live report with its shared-storage check replaced by the relocate's disk checks."""
    disk_results = [
        _target_datastore(target, datastore),
        _space(target, datastore, need_mib),
        _format(disk_format),
    ]
    results: list[CheckResult] = [_kind(MigrationKind.RELOCATE, vm)]
    for r in live.results:
        if r.check is CheckId.DATASTORES:
            results += disk_results
        else:
            results.append(r)
    if not any(r.check is CheckId.TARGET_DATASTORE for r in results):
        results += disk_results
    return CheckReport(results=results)
