"""A disk move's plan: the kind, the spec after the move, the hosts, and the checks' report."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from vmshift.migration.checks import HostView, VmView
from vmshift.migration.disk_checks import run_disk_checks
from vmshift.migration.disk_plan import moves_files, relocated_spec, room_needed_mib
from vmshift.migration.kinds import MoveAsked, kind_of
from vmshift.model.enums import DiskFormat, MigrationKind, PowerState
from vmshift.model.migration import CheckReport, CheckResult, MigrationCreate
from vmshift.model.vm import VmSpec
from vmshift.server.db.schema import HostRow, VmRow
from vmshift.server.inventory import get_host, get_vm, host_facts
from vmshift.server.migration_checks import migration_load
from vmshift.server.placement_rules import rules_result


@dataclass
class DiskMovePlan:
    kind: MigrationKind
    vm: str
    spec: VmSpec
    target_spec: VmSpec
    source: str
    target: str
    source_address: str
    target_address: str
    source_datastore: str
    target_datastore: str
    disk_format: DiskFormat | None
    report: CheckReport
    bandwidth_limit_bps: float | None = None  # the copy's rate cap (the request's, else the hosts')

    @property
    def other_host(self) -> bool:
        return self.source != self.target

    @property
    def copies(self) -> bool:
        """Some file changes datastore (False: a cold move between hosts that share the datastore)."""
        return moves_files(self.spec, self.target_datastore)


def _view(h: HostRow) -> HostView:
    return HostView(facts=host_facts(h), connection=h.connection_state, maintenance=h.maintenance,
                    datacenter=h.cluster.datacenter.name)


def kind_for(s: Session, vm_name: str, body: MigrationCreate) -> MigrationKind | CheckResult:
    """The kind of move a request asks for (a refusal result when it can ask for none)."""
    vm = get_vm(s, vm_name)
    spec = VmSpec.model_validate(vm.spec)
    host_changes = body.host is not None and body.host != vm.host.name
    return kind_of(MoveAsked(vm.power_state, host_changes, moves_files(spec, body.datastore),
                             host=vm.host.name, datastore=spec.datastore))


def plan_disk_move(s: Session, vm_name: str, body: MigrationCreate, kind: MigrationKind) -> DiskMovePlan:
    vm: VmRow = get_vm(s, vm_name)
    src = vm.host
    dst = get_host(s, body.host) if body.host is not None else src
    spec = VmSpec.model_validate(vm.spec)
    datastore = body.datastore or spec.datastore
    target_spec = relocated_spec(spec, datastore, body.disk_format) if moves_files(spec, datastore) else spec
    moves_state = vm.power_state is PowerState.SUSPENDED and spec.datastore != datastore
    state_mib = spec.memory_mib if moves_state else 0
    src_view, dst_view = _view(src), _view(dst)
    report = run_disk_checks(
        kind, VmView.from_spec(spec, vm.power_state, src_view.facts.accelerator), src_view, dst_view,
        datastore=datastore, need_mib=room_needed_mib(spec, datastore, state_mib),
        disk_format=body.disk_format,
        load=migration_load(s, src, dst),
    )
    if dst.id != src.id:
        report = CheckReport(results=[*report.results, rules_result(s, vm, dst)])
    return DiskMovePlan(kind=kind, vm=vm.name, spec=spec, target_spec=target_spec, source=src.name,
                        target=dst.name, source_address=src.address, target_address=dst.address,
                        source_datastore=spec.datastore, target_datastore=datastore,
                        disk_format=body.disk_format, report=report,
                        bandwidth_limit_bps=body.bandwidth_limit_bps or _host_limit(src, dst))


def _host_limit(src: HostRow, dst: HostRow) -> float | None:
    limits = [x for x in (src.migration_bandwidth_limit_bps, dst.migration_bandwidth_limit_bps) if x]
    return min(limits) if limits else None
