"""Placement filters: may this host run this VM, as the cluster stands in a ``ClusterState``?

The answer is the list of check results the migration checks show (``host_checks``), plus the
rules; a host fits when none is an ERROR. What depends only on the VM's configuration and the host
(CPU model, accelerator, machine type, datastores, networks) is cached per kind of VM, because a
pass over 10,000 VMs asks about the same few kinds again and again.
"""

from __future__ import annotations

from vmshift.model.migration import CheckId, CheckResult, CheckSeverity
from vmshift.placement.capacity import committed_mib
from vmshift.placement.host_checks import (
    accelerator_check,
    connection_check,
    cpu_model_check,
    datastores_check,
    machine_type_check,
    maintenance_check,
    memory_check,
    networks_check,
)
from vmshift.placement.rules import rules_check
from vmshift.placement.snapshot import HostState, VmState
from vmshift.placement.state import ClusterState

_Key = tuple[str, str, str, str, frozenset[str], frozenset[str]]


def _key(vm: VmState, host: str) -> _Key:
    return (host, vm.cpu_model, vm.machine_type, vm.accelerator.value, vm.datastores, vm.networks)


def static_checks(vm: VmState, host: HostState) -> list[CheckResult]:
    missing = [("the VM's disks", d) for d in sorted(vm.datastores) if d not in host.datastores]
    return [
        connection_check(CheckId.TARGET_CONNECTED, "target", host.name, host.connection),
        maintenance_check(host.name, host.maintenance),
        cpu_model_check(vm.cpu_model, host.name, host.cpu_models),
        accelerator_check(vm.name, vm.accelerator, host.name, host.accelerator),
        machine_type_check(vm.machine_type, host.name, host.machine_types),
        datastores_check(host.name, missing),
        networks_check(vm.name, sorted(vm.networks), host.name, host.networks),
    ]


class Filters:
    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self._static_ok: dict[_Key, bool] = {}

    def checks(self, vm: VmState, host: str) -> list[CheckResult]:
        """Every filter's result for ``vm`` on ``host``, in a fixed order."""
        s = self.state
        h = s.snapshot.host(host)
        free = s.free_mib(host) + (committed_mib(vm.memory_mib) if s.host_of.get(vm.name) == host else 0)
        return [
            *static_checks(vm, h),
            memory_check(vm.name, vm.memory_mib, committed_mib(vm.memory_mib), host, free),
            rules_check(vm.name, host, s.rules_of.get(vm.name, []), s.host_of),
        ]

    def fits(self, vm: VmState, host: str) -> bool:
        """No ERROR among ``checks``, answered without building the sentences when it can be."""
        key = _key(vm, host)
        ok = self._static_ok.get(key)
        if ok is None:
            ok = not any(r.severity is CheckSeverity.ERROR
                         for r in static_checks(vm, self.state.snapshot.host(host)))
            self._static_ok[key] = ok
        if not ok or self.state.free_mib(host) < committed_mib(vm.memory_mib):
            return False
        rules = self.state.rules_of.get(vm.name)
        if not rules:
            return True
        return rules_check(vm.name, host, rules, self.state.host_of).severity is not CheckSeverity.ERROR

    def breaks_should(self, vm: VmState, host: str) -> bool:
        rules = self.state.rules_of.get(vm.name)
        return bool(rules) and rules_check(vm.name, host, rules or [], self.state.host_of).severity \
            is CheckSeverity.WARNING
