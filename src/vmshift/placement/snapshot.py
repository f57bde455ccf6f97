"""What the placement engine sees: a cluster snapshot and its rules. Plain frozen values, no I/O.

The server builds a snapshot from its inventory and the agents' load reports; the bench and the
tests build them by hand. Loads are measured use (cores busy, MiB in use), capacities are what the
host offers; a VM's configured memory is what it commits on its host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmshift.errors import InvalidInputError
from vmshift.model.enums import Accelerator, ConnectionState, PowerState
from vmshift.model.host import CpuModelInfo
from vmshift.model.placement import DrsAutomation as DrsAutomation
from vmshift.model.placement import RuleKind as RuleKind
from vmshift.model.placement import RuleStrength as RuleStrength
from vmshift.model.placement import VmDrs as VmDrs
from vmshift.placement.capacity import DEFAULT_MIGRATION_LIMIT


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    kind: RuleKind
    strength: RuleStrength
    vms: frozenset[str]
    hosts: frozenset[str] = frozenset()  # the VM-host kinds only

    def __post_init__(self) -> None:
        vm_host = self.kind in (RuleKind.VM_HOST_AFFINITY, RuleKind.VM_HOST_ANTI_AFFINITY)
        if not self.vms:
            raise InvalidInputError(f"Rule {self.name!r} names no VM.", hint="Name the VMs it applies to.")
        if vm_host and not self.hosts:
            raise InvalidInputError(f"Rule {self.name!r} ({self.kind.value}) names no host.",
                                    hint="Name the hosts the VMs must (or must not) run on.")
        if not vm_host and self.hosts:
            raise InvalidInputError(f"Rule {self.name!r} ({self.kind.value}) is between VMs, so it takes no "
                                    "hosts.", hint="Use vm_host_affinity or vm_host_anti_affinity for hosts.")


@dataclass(frozen=True, slots=True)
class LoadSample:
    """One sample of a VM's use: ``cpu`` in cores busy (1.5 = one and a half vCPUs flat out)."""

    cpu: float
    memory_mib: float


@dataclass(frozen=True, slots=True)
class VmState:
    name: str
    host: str
    cpus: int
    memory_mib: int  # configured: what the VM commits on its host
    datastores: frozenset[str] = frozenset()
    networks: frozenset[str] = frozenset()
    cpu_model: str = "qemu64"
    machine_type: str = "pc-q35-10.0"
    accelerator: Accelerator = Accelerator.KVM
    power_state: PowerState = PowerState.POWERED_ON
    #: oldest first, one sample per history step, aligned across the cluster's VMs
    history: tuple[LoadSample, ...] = ()
    drs: VmDrs = VmDrs.CLUSTER
    last_moved_s: float | None = None  # when a migration of it last ended (snapshot clock)
    dirty_rate_bps: float = 0.0  # measured page dirtying; feeds the migration estimator
    max_downtime_ms: int = 500
    migrating_to: str | None = None  # a migration in flight commits memory on this host too

    @property
    def powered_on(self) -> bool:
        return self.power_state is PowerState.POWERED_ON


@dataclass(frozen=True, slots=True)
class HostState:
    name: str
    cpus: int
    memory_mib: int  # what VMs may commit (total less the host's own reserve)
    connection: ConnectionState = ConnectionState.CONNECTED
    maintenance: bool = False
    cpu_models: tuple[CpuModelInfo, ...] = ()
    accelerator: Accelerator = Accelerator.KVM
    machine_types: frozenset[str] = frozenset()
    datastores: frozenset[str] = frozenset()  # names; one name is one shared datastore
    networks: frozenset[str] = frozenset()
    migration_limit: int = DEFAULT_MIGRATION_LIMIT
    migrations_running: int = 0
    bandwidth_bps: float = 1.25e9  # the migration link (10 Gbit/s)

    @property
    def usable(self) -> bool:
        """Whether VMs may be placed here at all."""
        return self.connection is ConnectionState.CONNECTED and not self.maintenance


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    hosts: tuple[HostState, ...]
    vms: tuple[VmState, ...]
    rules: tuple[Rule, ...] = ()
    now_s: float = 0.0
    history_step_s: float = 20.0
    _hosts_by_name: dict[str, HostState] = field(init=False, repr=False, compare=False)
    _vms_by_name: dict[str, VmState] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hosts_by_name", {h.name: h for h in self.hosts})
        object.__setattr__(self, "_vms_by_name", {v.name: v for v in self.vms})
        for what, names, unique in (("host", [h.name for h in self.hosts], self._hosts_by_name),
                                    ("VM", [v.name for v in self.vms], self._vms_by_name)):
            if len(unique) != len(names):
                twice = next(n for n in names if names.count(n) > 1)
                raise InvalidInputError(f"The snapshot names {what} {twice!r} twice.",
                                        hint=f"Each {what} appears once.")
        bad = next((h for h in self.hosts if h.cpus < 1 or h.memory_mib < 1), None)
        if bad is not None:
            raise InvalidInputError(f"Host {bad.name!r} has {bad.cpus} CPUs and {bad.memory_mib} MiB.",
                                    hint="A host's capacity is at least one CPU and one MiB.")
        vm = next((v for v in self.vms if v.cpus < 1 or v.memory_mib < 1), None)
        if vm is not None:
            raise InvalidInputError(f"VM {vm.name!r} has {vm.cpus} vCPUs and {vm.memory_mib} MiB.",
                                    hint="A VM has at least one vCPU and one MiB.")

    def host(self, name: str) -> HostState:
        return self._hosts_by_name[name]

    def vm(self, name: str) -> VmState:
        return self._vms_by_name[name]

    def has_host(self, name: str) -> bool:
        return name in self._hosts_by_name

    def has_vm(self, name: str) -> bool:
        return name in self._vms_by_name
