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

#: The checks of disk moves only (``vmshift.migration.disk_checks``); a live migration runs the rest.
DISK_MOVE_CHECKS = frozenset(
    {CheckId.KIND, CheckId.TARGET_DATASTORE, CheckId.DATASTORE_SPACE, CheckId.DISK_FORMAT}
)
LIVE_CHECKS = tuple(c for c in CheckId if c not in DISK_MOVE_CHECKS)

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

QEMU_OVERHEAD_MIB = 64  # memory a QEMU process needs beyond the guest's RAM


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
    """Migrations already running per host, and the per-host limit."""

    running: dict[str, int] = field(default_factory=dict)
    limit: int = 4


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
    for check, host, role in (
        (CheckId.SOURCE_CONNECTED, src, "source"),
        (CheckId.TARGET_CONNECTED, dst, "target"),
    ):
        if host.connection is ConnectionState.CONNECTED:
            out.append(_r(check, OK, f"The {role} host {host.name} is connected."))
        else:
            out.append(
                _r(
                    check,
                    ERR,
                    f"The {role} host {host.name} is {host.connection.value}.",
                    "Wait until its agent answers again, or check the agent on that host.",
                )
            )
    if dst.maintenance:
        out.append(
            _r(
                CheckId.TARGET_MAINTENANCE,
                ERR,
                f"The target host {dst.name} is in maintenance mode.",
                "Take it out of maintenance mode or choose another host.",
            )
        )
    else:
        out.append(
            _r(CheckId.TARGET_MAINTENANCE, OK, f"The target host {dst.name} is not in maintenance mode.")
        )
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
    facts, out = dst.facts, []
    model = next((m for m in facts.cpu_models if m.name == vm.cpu_model), None)
    if not facts.cpu_models:
        out.append(
            _r(
                CheckId.CPU_MODEL,
                WARN,
                f"Host {dst.name} reported no CPU models, so CPU model "
                f"'{vm.cpu_model}' could not be verified.",
                "Refresh the host's facts.",
            )
        )
    elif model is None:
        out.append(
            _r(
                CheckId.CPU_MODEL,
                ERR,
                f"The QEMU on {dst.name} does not know CPU model '{vm.cpu_model}'.",
                "Use a cluster CPU baseline that every host runs.",
            )
        )
    elif model.unavailable_features:
        missing = ", ".join(model.unavailable_features[:8])
        out.append(
            _r(
                CheckId.CPU_MODEL,
                ERR,
                f"Host {dst.name} cannot run CPU model '{vm.cpu_model}': it lacks {missing}.",
                "Give the VM the cluster's CPU baseline (EVC-style) and restart it.",
            )
        )
    else:
        out.append(
            _r(CheckId.CPU_MODEL, OK, f"Host {dst.name} runs CPU model '{vm.cpu_model}' with every feature.")
        )
    if facts.accelerator is vm.accelerator:
        out.append(
            _r(
                CheckId.ACCELERATOR,
                OK,
                f"Host {dst.name} uses the same accelerator ({vm.accelerator.value}) as the VM.",
            )
        )
    else:
        out.append(
            _r(
                CheckId.ACCELERATOR,
                ERR,
                f"VM '{vm.name}' runs under {vm.accelerator.value} but host "
                f"{dst.name} uses {facts.accelerator.value}.",
                "Choose a host with the same accelerator.",
            )
        )
    if not facts.machine_types:
        out.append(
            _r(
                CheckId.MACHINE_TYPE,
                WARN,
                f"Host {dst.name} reported no machine types, so '{vm.machine_type}' could not be verified.",
                "Refresh the host's facts.",
            )
        )
    elif vm.machine_type in facts.machine_types:
        out.append(
            _r(CheckId.MACHINE_TYPE, OK, f"The QEMU on {dst.name} has machine type '{vm.machine_type}'.")
        )
    else:
        out.append(
            _r(
                CheckId.MACHINE_TYPE,
                ERR,
                f"The QEMU on {dst.name} lacks machine type '{vm.machine_type}'.",
                "Upgrade QEMU on the target or choose a host with the same QEMU version.",
            )
        )
    return out


def _memory(vm: VmView, dst: HostView) -> CheckResult:
    need = vm.memory_mib + QEMU_OVERHEAD_MIB
    free = dst.facts.memory_free_mib
    if free >= need:
        return _r(
            CheckId.MEMORY, OK, f"Host {dst.name} has {free} MiB free for the VM's {vm.memory_mib} MiB."
        )
    return _r(
        CheckId.MEMORY,
        ERR,
        f"Host {dst.name} has {free} MiB free but VM '{vm.name}' needs {need} MiB "
        f"({vm.memory_mib} MiB plus QEMU's overhead).",
        "Free memory on the target or choose another host.",
    )


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
    if not missing:
        return _r(CheckId.DATASTORES, OK, f"Every disk's datastore is visible from {dst.name}.")
    first = missing[0]
    more = f" (and {len(missing) - 1} more disk(s))" if len(missing) > 1 else ""
    return _r(
        CheckId.DATASTORES,
        ERR,
        f"Datastore '{first.datastore}' holding {first.name}{more} is not visible "
        f"from {dst.name}: a shared-nothing migration (moving the disks too) is needed.",
        "Move the disks to a shared datastore first, or migrate with storage.",
    )


def _networks(vm: VmView, dst: HostView) -> CheckResult:
    missing = [n for n in dict.fromkeys(vm.networks) if n not in dst.facts.networks]
    if not missing:
        return _r(CheckId.NETWORKS, OK, f"Every network of the VM exists on {dst.name}.")
    names = ", ".join(f"'{n}'" for n in missing)
    return _r(
        CheckId.NETWORKS,
        ERR,
        f"Network {names} of VM '{vm.name}' does not exist on {dst.name}.",
        "Map the network to a bridge in the target agent's configuration.",
    )


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
    busy = [
        f"{h.name} ({load.running.get(h.name, 0)})"
        for h in (src, dst)
        if load.running.get(h.name, 0) >= load.limit
    ]
    if not busy:
        return _r(
            CheckId.CONCURRENCY, OK, f"Both hosts are below the limit of {load.limit} concurrent migrations."
        )
    return _r(
        CheckId.CONCURRENCY,
        WARN,
        f"Host {' and '.join(busy)} is at the limit of {load.limit} concurrent "
        "migrations, so this one will wait in the queue.",
        "It starts when a running migration ends.",
    )


def run_checks(
    vm: VmView,
    source: HostView,
    target: HostView,
    *,
    reachable: bool | None = None,
    load: MigrationLoad | None = None,
    requested_encryption: MigrationEncryption | None = None,
) -> CheckReport:
    """Every pre-migration check, one result each, in a fixed order."""
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
    ]
    return CheckReport(results=results)
