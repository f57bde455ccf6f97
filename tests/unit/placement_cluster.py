"""Hand-made clusters for the placement tests: a few lines say what each host and VM is."""

from __future__ import annotations

from typing import Any

from vmshift.model.host import CpuModelInfo
from vmshift.placement.snapshot import ClusterSnapshot, HostState, LoadSample, Rule, VmState

WINDOW = 15  # 5 minutes at 20 s
SHARED = frozenset({"shared-1"})
NETS = frozenset({"VM Network"})


def host(name: str, cpus: int = 4, memory_mib: int = 8192, **over: Any) -> HostState:
    base: dict[str, Any] = dict(cpu_models=(CpuModelInfo(name="qemu64"),),
                                machine_types=frozenset({"pc-q35-10.0"}), datastores=SHARED, networks=NETS)
    return HostState(name, cpus, memory_mib, **(base | over))


def steady(cpu: float, memory_mib: float, n: int = WINDOW) -> tuple[LoadSample, ...]:
    return (LoadSample(cpu, memory_mib),) * n


def vm(name: str, on: str, cpu: float = 0.1, used_mib: float = 200, memory_mib: int = 1024,
       **over: Any) -> VmState:
    base: dict[str, Any] = dict(datastores=SHARED, networks=NETS, cpu_model="qemu64", dirty_rate_bps=5e6,
                                history=steady(cpu, used_mib))
    return VmState(name, on, 2, memory_mib, **(base | over))


def cluster(hosts: list[HostState], vms: list[VmState], rules: list[Rule] | None = None,
            now_s: float = 100_000.0) -> ClusterSnapshot:
    return ClusterSnapshot(tuple(hosts), tuple(vms), tuple(rules or ()), now_s=now_s)
