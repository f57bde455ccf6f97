"""Pre-migration checks (issue 3, item 2). Pure: typed views in, a CheckReport out.

Every check yields exactly one result with its own sentence, so a report reads as a list of
what was verified. ERROR blocks the migration; WARNING does not (a host at its concurrent
migration limit means "queue", and unknown facts are reported, not guessed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from vmshift.migration.encryption import (
    EncryptionDecision,
    EncryptionRefusal,
    HostEncryption,
    decide_encryption,
)
from vmshift.model.enums import Accelerator, ConnectionState, MigrationEncryption, PowerState
from vmshift.model.host import HostFacts
from vmshift.model.migration import CheckId, CheckReport, CheckResult, CheckSeverity
from vmshift.model.vm import VmSpec
from vmshift.placement.capacity import DEFAULT_MIGRATION_LIMIT, committed_mib
from vmshift.placement.host_checks import (
    accelerator_check,
    concurrency_check,
    connection_check,
    cpu_model_check,
    datastores_check,
    machine_type_check,
    maintenance_check,
    memory_check,
    networks_check,
)

#: The checks of disk moves only (``vmshift.migration.disk_checks``); a live migration runs the rest.
DISK_MOVE_CHECKS = frozenset(
    {CheckId.KIND, CheckId.TARGET_DATASTORE, CheckId.DATASTORE_SPACE, CheckId.DISK_FORMAT}
)
#: Placement's own checks: a migration's report ends with the rules' result when the server gives it
#: (a move to another host; ``run_checks(rules=...)``).
PLACEMENT_ONLY_CHECKS = frozenset({CheckId.RULES})
LIVE_CHECKS = tuple(c for c in CheckId if c not in DISK_MOVE_CHECKS | PLACEMENT_ONLY_CHECKS)

__all__ = [
    "CheckId",
    "CheckReport",
    "CheckResult",
    "CheckSeverity",
    "DiskView",
    "HostView",
    "MigrationLoad",
    "VmView",
    "run_checks",
]

@dataclass(frozen=True, slots=True)
class DiskView:
    name: str  # e.g. "disk0"
    datastore: str  # datastore name


@dataclass(frozen=True, slots=True)
class VmView:
    """What the checks need to know about the VM."""

    name: str
    power_state: PowerState
    cpu_model: str
    machine_type: str
    memory_mib: int
    accelerator: Accelerator
    disks: tuple[DiskView, ...] = ()
    networks: tuple[str, ...] = ()
    host_bound_devices: tuple[str, ...] = ()  # e.g. passthrough PCI devices, host USB
    encryption: MigrationEncryption = MigrationEncryption.OPPORTUNISTIC

    @classmethod
    def from_spec(
        cls,
        spec: VmSpec,
        power_state: PowerState,
        accelerator: Accelerator,
        host_bound_devices: Sequence[str] = (),
        encryption: MigrationEncryption = MigrationEncryption.OPPORTUNISTIC,
    ) -> VmView:
        return cls(
            name=spec.name,
            power_state=power_state,
            cpu_model=spec.cpu_model,
            machine_type=spec.machine_type,
            memory_mib=spec.memory_mib,
            accelerator=accelerator,
            disks=tuple(DiskView(d.file.rsplit(".", 1)[0], d.datastore) for d in spec.disks),
            networks=tuple(n.network for n in spec.nics),
            host_bound_devices=tuple(host_bound_devices),
            encryption=encryption,
        )


@dataclass(frozen=True, slots=True)
class HostView:
    """A host as the server sees it: its agent's facts plus inventory state."""

    facts: HostFacts
    connection: ConnectionState = ConnectionState.CONNECTED
    maintenance: bool = False
    datacenter: str = "Datacenter"
    encryption: MigrationEncryption = MigrationEncryption.OPPORTUNISTIC
    has_certificate: bool = False  # the cluster CA issued it one (host.cert_fingerprint)

    @property
    def name(self) -> str:
        return self.facts.name

    @property
    def tls(self) -> HostEncryption:
        return HostEncryption(self.name, self.encryption, self.has_certificate)


@dataclass(frozen=True, slots=True)
class MigrationLoad:
    """Migrations already running per host, and each host's limit (``limit`` where none is given)."""

    running: dict[str, int] = field(default_factory=dict)
    limit: int = DEFAULT_MIGRATION_LIMIT
    limits: dict[str, int] = field(default_factory=dict)

    def limits_of(self, *hosts: str) -> dict[str, int]:
        return {h: self.limits.get(h, self.limit) for h in hosts}


def _r(check: CheckId, severity: CheckSeverity, message: str, hint: str | None = None) -> CheckResult:
    return CheckResult(check=check, severity=severity, message=message, hint=hint)


OK, WARN, ERR = CheckSeverity.OK, CheckSeverity.WARNING, CheckSeverity.ERROR


def _power(vm: VmView) -> CheckResult:
    if vm.power_state is PowerState.POWERED_ON:
        return _r(CheckId.POWER_STATE, OK, f"VM '{vm.name}' is powered on.")
    return _r(
        CheckId.POWER_STATE,
        ERR,
        f"VM '{vm.name}' is {vm.power_state.value}, and only a powered-on VM can be live-migrated.",
        "Power it on, or use a cold migration.",
    )


def _hosts(vm: VmView, src: HostView, dst: HostView) -> list[CheckResult]:
    out = []
    if src.name == dst.name:
        out.append(
            _r(
                CheckId.DIFFERENT_HOST,
                ERR,
                f"VM '{vm.name}' already runs on {dst.name}.",
                "Choose another target host.",
            )
        )
    else:
        out.append(
            _r(CheckId.DIFFERENT_HOST, OK, f"The target {dst.name} differs from the source {src.name}.")
        )
    out.append(connection_check(CheckId.SOURCE_CONNECTED, "source", src.name, src.connection))
    out.append(connection_check(CheckId.TARGET_CONNECTED, "target", dst.name, dst.connection))
    out.append(maintenance_check(dst.name, dst.maintenance))
    if src.datacenter != dst.datacenter:
        out.append(
            _r(
                CheckId.DATACENTER,
                ERR,
                f"The source host {src.name} is in datacenter '{src.datacenter}' "
                f"but the target {dst.name} is in '{dst.datacenter}'.",
                "Choose a host in the same datacenter.",
            )
        )
    else:
        out.append(_r(CheckId.DATACENTER, OK, f"Both hosts are in datacenter '{dst.datacenter}'."))
    return out


def _cpu(vm: VmView, dst: HostView) -> list[CheckResult]:
    facts = dst.facts
    return [
        cpu_model_check(vm.cpu_model, dst.name, facts.cpu_models),
        accelerator_check(vm.name, vm.accelerator, dst.name, facts.accelerator),
        machine_type_check(vm.machine_type, dst.name, facts.machine_types),
    ]


def _memory(vm: VmView, dst: HostView) -> CheckResult:
    return memory_check(vm.name, vm.memory_mib, committed_mib(vm.memory_mib), dst.name,
                        dst.facts.memory_free_mib)


def _storage(vm: VmView, src: HostView, dst: HostView) -> CheckResult:
    src_uuid = {d.name: d.uuid for d in src.facts.datastores}
    dst_names = {d.name for d in dst.facts.datastores}
    dst_uuids = {d.uuid for d in dst.facts.datastores}
    missing = [
        d
        for d in vm.disks
        if not (
            src_uuid.get(d.datastore) in dst_uuids if d.datastore in src_uuid else d.datastore in dst_names
        )
    ]
    return datastores_check(dst.name, [(d.name, d.datastore) for d in missing])


def _networks(vm: VmView, dst: HostView) -> CheckResult:
    return networks_check(vm.name, vm.networks, dst.name, dst.facts.networks)


def _link(src: HostView, dst: HostView, reachable: bool | None) -> list[CheckResult]:
    lacking = [h.name for h in (src, dst) if not h.facts.migration_address]
    if lacking:
        addr = _r(
            CheckId.MIGRATION_ADDRESS,
            ERR,
            f"Host {' and '.join(lacking)} has no migration address.",
            "Set migration_address in the agent's configuration.",
        )
    else:
        addr = _r(
            CheckId.MIGRATION_ADDRESS,
            OK,
            f"Both hosts have migration addresses ({src.facts.migration_address}"
            f" and {dst.facts.migration_address}).",
        )
    if lacking:
        reach = _r(
            CheckId.REACHABILITY, ERR, "The migration link cannot be tested without both migration addresses."
        )
    elif reachable is None:
        reach = _r(
            CheckId.REACHABILITY,
            WARN,
            f"Whether {src.facts.migration_address} reaches {dst.facts.migration_address} is not known yet.",
            "The migration will test it when it starts.",
        )
    elif reachable:
        reach = _r(CheckId.REACHABILITY, OK, f"{src.name} reaches {dst.name} on the migration network.")
    else:
        reach = _r(
            CheckId.REACHABILITY,
            ERR,
            f"{src.name} cannot reach {dst.facts.migration_address} on the migration network.",
            "Check the migration network's links and addresses.",
        )
    return [addr, reach]


def encryption_decision(
    vm: VmView, src: HostView, dst: HostView, requested: MigrationEncryption | None = None
) -> EncryptionDecision | EncryptionRefusal:
    """Whether the memory stream goes over TLS (``vmshift.migration.encryption`` decides)."""
    return decide_encryption(vm.name, vm.encryption, requested, src.tls, dst.tls)


def _encryption(vm: VmView, src: HostView, dst: HostView,
                requested: MigrationEncryption | None) -> CheckResult:
    d = encryption_decision(vm, src, dst, requested)
    if isinstance(d, EncryptionRefusal):
        return _r(CheckId.ENCRYPTION, ERR, d.message, d.hint)
    if d.warning is not None:
        return _r(CheckId.ENCRYPTION, WARN, d.warning,
                  "Give both hosts certificates from the cluster CA, or set '--encryption disabled' "
                  "to migrate plain without this warning.")
    if d.encrypt:
        return _r(CheckId.ENCRYPTION, OK, f"The memory stream will be encrypted (TLS between {src.name} "
                  f"and {dst.name}).")
    return _r(CheckId.ENCRYPTION, OK, "The memory stream will not be encrypted, as its setting asks "
              "(encryption disabled).")


def _devices(vm: VmView) -> CheckResult:
    if not vm.host_bound_devices:
        return _r(CheckId.HOST_BOUND_DEVICES, OK, f"VM '{vm.name}' has no device bound to its host.")
    names = ", ".join(vm.host_bound_devices)
    return _r(
        CheckId.HOST_BOUND_DEVICES,
        ERR,
        f"VM '{vm.name}' uses host-bound device(s) {names}, which cannot move with it.",
        "Detach them before migrating.",
    )


def _load(src: HostView, dst: HostView, load: MigrationLoad) -> CheckResult:
    return concurrency_check([src.name, dst.name], load.running, load.limits_of(src.name, dst.name))


def run_checks(
    vm: VmView,
    source: HostView,
    target: HostView,
    *,
    reachable: bool | None = None,
    load: MigrationLoad | None = None,
    requested_encryption: MigrationEncryption | None = None,
    rules: CheckResult | None = None,
) -> CheckReport:
    """Every pre-migration check, one result each, in a fixed order; ``rules``: the affinity rules'
    verdict on the target (``vmshift.placement.rules.rules_check``), last when given."""
    results = [
        _power(vm),
        *_hosts(vm, source, target),
        *_cpu(vm, target),
        _memory(vm, target),
        _storage(vm, source, target),
        _networks(vm, target),
        *_link(source, target, reachable),
        _encryption(vm, source, target, requested_encryption),
        _devices(vm),
        _load(source, target, load or MigrationLoad()),
        *([rules] if rules is not None else []),
    ]
    return CheckReport(results=results)
