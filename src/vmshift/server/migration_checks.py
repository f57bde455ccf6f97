"""Pre-migration checks fed with live facts, and the estimate (issue 3, items 2 and 3).

The pure ``vmshift.migration.checks`` and ``estimator`` decide; this module gathers what they need:
the host rows, the VM's spec and settings, the migrations already running, and two agent calls
(a TCP sink on the target, a measurement from the source) that prove the migration link works and
measure its bandwidth.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from vmshift.client.agent import AgentPool
from vmshift.errors import InvalidInputError, VmshiftError
from vmshift.migration.checks import HostView, MigrationLoad, VmView, encryption_decision, run_checks
from vmshift.migration.disk_plan import relocated_spec, room_needed_mib
from vmshift.migration.estimator import estimate, zero_fraction_from_resident
from vmshift.migration.policy import PolicySettings
from vmshift.migration.relocate_checks import relocate_report
from vmshift.model.agent_migration import MeasureRequest, SinkRequest
from vmshift.model.enums import ConnectionState, DiskFormat, MigrationKind
from vmshift.model.migration import (
    CheckId,
    CheckReport,
    CheckResult,
    CheckSeverity,
    MigrationCreate,
    MigrationPrediction,
    MigrationSettings,
    MigrationStatus,
)
from vmshift.model.vm import VmSpec
from vmshift.server.db.schema import HostRow, MigrationRow, VmRow
from vmshift.server.inventory import get_host, get_vm, host_facts
from vmshift.server.placement_rules import rules_result

SINK_SECONDS = 5.0
MEASURE_SECONDS = 0.5
DIRTY_RATE_SECONDS = 1

# A failing check answers 422 when the request can never work as asked, 409 when the state may change.
_UNPROCESSABLE = {
    CheckId.CPU_MODEL,
    CheckId.ACCELERATOR,
    CheckId.MACHINE_TYPE,
    CheckId.MEMORY,
    CheckId.DATASTORES,
    CheckId.NETWORKS,
    CheckId.MIGRATION_ADDRESS,
    CheckId.HOST_BOUND_DEVICES,
    CheckId.TARGET_DATASTORE,
    CheckId.DISK_FORMAT,
}


def status_for(result: CheckResult) -> int:
    return 422 if result.check in _UNPROCESSABLE else 409


@dataclass
class Plan:
    """Everything the checks found out, for the answer and for the migration row."""

    vm: str
    spec: VmSpec
    source: str
    target: str
    source_address: str
    target_address: str
    settings: MigrationSettings
    report: CheckReport
    bandwidth_bps: float | None  # measured on the migration link (None = not measured)
    link_rate_bps: float | None  # configured on the hosts (the slower one)
    kind: MigrationKind = MigrationKind.LIVE
    target_spec: VmSpec | None = None  # a relocate: the spec after the move (its disks on the target)
    target_datastore: str | None = None
    disk_format: DiskFormat | None = None


def running_per_host(s: Session) -> Counter[str]:
    """Running migrations per host (a migration counts on its source and on its target)."""
    load: Counter[str] = Counter()
    for src, dst in s.execute(
        select(MigrationRow.source_host, MigrationRow.target_host).where(
            MigrationRow.status == MigrationStatus.RUNNING
        )
    ):
        load[src] += 1
        load[dst] += 1
    return load


def _host_view(h: HostRow) -> HostView:
    return HostView(
        facts=host_facts(h),
        connection=h.connection_state,
        maintenance=h.maintenance,
        datacenter=h.cluster.datacenter.name,
        encryption=h.migration_encryption,
        has_certificate=h.cert_fingerprint is not None,
    )


def settings_for(vm: VmRow, src: HostRow, dst: HostRow, body: MigrationCreate) -> MigrationSettings:
    """The request's knobs, else the VM's SLA and the hosts' bandwidth limit (the lower one)."""
    limits = [x for x in (src.migration_bandwidth_limit_bps, dst.migration_bandwidth_limit_bps) if x]
    allow_postcopy = vm.allow_postcopy if body.allow_postcopy is None else body.allow_postcopy
    if body.postcopy_after_s is not None and not allow_postcopy:
        raise InvalidInputError(f"A switch to post-copy after {body.postcopy_after_s:g} s was asked for, "
                                f"but post-copy is not allowed for VM {vm.name!r}.",
                                hint="Add --allow-postcopy, or allow it on the VM with "
                                     "'vmshift vm migration-settings VM --allow-postcopy'.")
    return MigrationSettings(
        max_downtime_ms=body.max_downtime_ms or vm.max_downtime_ms,
        allow_postcopy=allow_postcopy,
        postcopy_after_s=body.postcopy_after_s,
        bandwidth_limit_bps=body.bandwidth_limit_bps or (min(limits) if limits else None),
    )


def migration_load(s: Session, *hosts: HostRow) -> MigrationLoad:
    """What the concurrency rule needs about ``hosts``: migrations running, each host's limit."""
    return MigrationLoad(running=dict(running_per_host(s)), limits={h.name: h.migration_limit for h in hosts})


def _replace(report: CheckReport, result: CheckResult) -> CheckReport:
    return CheckReport(results=[result if r.check is result.check else r for r in report.results])


async def measure_link(
    agents: AgentPool, source_address: str, target_address: str
) -> tuple[bool, float | None, CheckResult | None]:
    """Ask the target for a sink and the source to send to it: (reachable, bandwidth, failure result)."""
    try:
        sink = await agents.get(target_address).netperf_sink(SinkRequest(seconds=SINK_SECONDS))
        m = await agents.get(source_address).netperf_measure(
            MeasureRequest(address=sink.address, port=sink.port, seconds=MEASURE_SECONDS)
        )
    except VmshiftError as e:
        # An agent older than the netperf endpoints has no such route, or not for this method.
        missing = e.not_found or e.code == "method_not_allowed"
        why = "its agent has no netperf endpoint (agent too old?)" if missing else e.message.rstrip(".")
        return (
            False,
            None,
            CheckResult(
                check=CheckId.REACHABILITY,
                severity=CheckSeverity.ERROR,
                message=f"The migration link could not be tested: {why}.",
                hint=e.hint or "Check that both agents run and are up to date.",
            ),
        )
    if not m.reachable:
        return (
            False,
            None,
            CheckResult(
                check=CheckId.REACHABILITY,
                severity=CheckSeverity.ERROR,
                message=f"The source cannot reach {sink.address}:{sink.port} on the migration network"
                f"{f' ({m.error})' if m.error else ''}.",
                hint="Check the migration network's links, addresses and firewalls.",
            ),
        )
    return True, m.bandwidth_bps, None


@dataclass
class _Gathered:
    plan: Plan
    vm: VmView
    source: HostView
    target: HostView
    link_testable: bool
    load: MigrationLoad
    rules: CheckResult | None


def _gather(s: Session, vm_name: str, body: MigrationCreate, kind: MigrationKind) -> _Gathered:
    vm = get_vm(s, vm_name)
    src = vm.host
    dst = get_host(s, body.host) if body.host is not None else src
    spec = VmSpec.model_validate(vm.spec)
    src_view, dst_view = _host_view(src), _host_view(dst)
    vm_view = VmView.from_spec(spec, vm.power_state, src_view.facts.accelerator,
                               encryption=vm.migration_encryption)
    rates = [x for x in (src.migration_link_rate_bps, dst.migration_link_rate_bps) if x]
    plan = Plan(
        vm=vm.name,
        spec=spec,
        source=src.name,
        target=dst.name,
        source_address=src.address,
        target_address=dst.address,
        settings=settings_for(vm, src, dst, body),
        report=CheckReport(results=[]),
        bandwidth_bps=None,
        link_rate_bps=min(rates) if rates else None,
    )
    # the effective choice (a refusal says REQUIRED; its check result stops the migration)
    encryption = encryption_decision(vm_view, src_view, dst_view, body.encryption).setting
    plan.settings = plan.settings.model_copy(update={"encryption": encryption})
    if kind is MigrationKind.RELOCATE and body.datastore is not None:
        # a relocate never hands the VM over before its disks are complete: no post-copy
        plan.settings = plan.settings.model_copy(update={"allow_postcopy": False, "postcopy_after_s": None})
        plan.kind, plan.target_datastore, plan.disk_format = kind, body.datastore, body.disk_format
        plan.target_spec = relocated_spec(spec, body.datastore, body.disk_format)
    link_testable = (
        src.name != dst.name
        and src.connection_state is ConnectionState.CONNECTED
        and dst.connection_state is ConnectionState.CONNECTED
        and bool(src_view.facts.migration_address and dst_view.facts.migration_address)
    )
    rules = rules_result(s, vm, dst) if dst.id != src.id else None
    return _Gathered(plan, vm_view, src_view, dst_view, link_testable, migration_load(s, src, dst), rules)


async def plan_migration(
    sessions: sessionmaker[Session], agents: AgentPool, vm_name: str, body: MigrationCreate,
    kind: MigrationKind = MigrationKind.LIVE,
) -> Plan:
    """Run every check with live facts. Raises only for unknown names; check failures are in the report.

    A relocate (``kind``) runs the live checks with its disk checks in place of the shared-storage one.
    The database is read first and closed before the agents are asked (no transaction spans I/O).
    """
    with sessions() as s:
        g = _gather(s, vm_name, body, kind)
    plan, vm_view, dst_view = g.plan, g.vm, g.target
    reachable: bool | None = None
    failure: CheckResult | None = None
    if g.link_testable:
        reachable, plan.bandwidth_bps, failure = await measure_link(
            agents, plan.source_address, plan.target_address
        )
    report = run_checks(vm_view, g.source, dst_view, reachable=reachable, load=g.load,
                        requested_encryption=body.encryption, rules=g.rules)
    if failure is not None:
        report = _replace(report, failure)
    if plan.target_spec is not None and plan.target_datastore is not None:
        report = relocate_report(report, vm_view, dst_view, datastore=plan.target_datastore,
                                 need_mib=room_needed_mib(plan.spec, plan.target_datastore),
                                 disk_format=plan.disk_format)
    plan.report = report
    return plan


def effective_bandwidth(
    measured_bps: float | None, link_rate_bps: float | None, limit_bps: float | None
) -> float | None:
    """What the migration can use: measured, else the configured link rate, capped by the limit."""
    bandwidth = measured_bps or link_rate_bps
    if limit_bps:
        bandwidth = min(bandwidth or limit_bps, limit_bps)
    return bandwidth


async def predict(
    agents: AgentPool,
    source_address: str,
    spec: VmSpec,
    settings: MigrationSettings,
    bandwidth_bps: float | None,
    *,
    source: str = "the source",
    target: str = "the target",
) -> MigrationPrediction:
    """Dirty rate from the source agent + bandwidth + memory size → the estimator's prediction."""
    if not bandwidth_bps:
        raise InvalidInputError(
            f"The bandwidth between {source} and {target} is unknown, so nothing can be predicted.",
            hint="Let the checks measure the migration link, or configure the hosts' link rate.",
        )
    rate = await agents.get(source_address).dirty_rate(spec.name, DIRTY_RATE_SECONDS)
    memory = spec.memory_mib * 2**20
    downtime_s = settings.max_downtime_ms / 1000
    zeros = (rate.zero_fraction if rate.zero_fraction is not None
             else zero_fraction_from_resident(memory, rate.resident_bytes))
    initial_s = PolicySettings.from_migration(settings).initial_downtime_s
    est = estimate(memory, rate.dirty_rate_bps, bandwidth_bps, downtime_s, zero_fraction=zeros,
                   initial_limit_s=initial_s)
    return est.to_prediction(memory, rate.dirty_rate_bps, bandwidth_bps, downtime_s, zero_fraction=zeros)


async def predict_plan(agents: AgentPool, plan: Plan) -> MigrationPrediction:
    bandwidth = effective_bandwidth(plan.bandwidth_bps, plan.link_rate_bps, plan.settings.bandwidth_limit_bps)
    return await predict(
        agents,
        plan.source_address,
        plan.spec,
        plan.settings,
        bandwidth,
        source=plan.source,
        target=plan.target,
    )
