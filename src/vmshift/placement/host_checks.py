"""The rules a host must pass to run a VM, each one result with its own sentence.

They take plain values, so the migration checks (``vmshift.migration.checks``, fed with an agent's
facts) and the placement filters (``vmshift.placement.filters``, fed with a cluster snapshot) share
one home for each rule. ERROR means the host cannot take the VM; WARNING that a fact is unknown or a
limit means waiting.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

from vmshift.model.enums import Accelerator, ConnectionState
from vmshift.model.host import CpuModelInfo
from vmshift.model.migration import CheckId, CheckResult, CheckSeverity
from vmshift.placement.capacity import DEFAULT_MIGRATION_LIMIT, at_limit

OK, WARN, ERR = CheckSeverity.OK, CheckSeverity.WARNING, CheckSeverity.ERROR


def result(check: CheckId, severity: CheckSeverity, message: str, hint: str | None = None) -> CheckResult:
    return CheckResult(check=check, severity=severity, message=message, hint=hint)


def connection_check(check: CheckId, role: str, host: str, state: ConnectionState) -> CheckResult:
    if state is ConnectionState.CONNECTED:
        return result(check, OK, f"The {role} host {host} is connected.")
    return result(check, ERR, f"The {role} host {host} is {state.value}.",
                  "Wait until its agent answers again, or check the agent on that host.")


def maintenance_check(host: str, maintenance: bool, role: str = "target") -> CheckResult:
    if maintenance:
        return result(CheckId.TARGET_MAINTENANCE, ERR, f"The {role} host {host} is in maintenance mode.",
                      "Take it out of maintenance mode or choose another host.")
    return result(CheckId.TARGET_MAINTENANCE, OK, f"The {role} host {host} is not in maintenance mode.")


def cpu_model_check(cpu_model: str, host: str, models: Sequence[CpuModelInfo]) -> CheckResult:
    if not models:
        return result(CheckId.CPU_MODEL, WARN,
                      f"Host {host} reported no CPU models, so CPU model '{cpu_model}' "
                      "could not be verified.",
                      "Refresh the host's facts.")
    model = next((m for m in models if m.name == cpu_model), None)
    if model is None:
        return result(CheckId.CPU_MODEL, ERR, f"The QEMU on {host} does not know CPU model '{cpu_model}'.",
                      "Use a cluster CPU baseline that every host runs.")
    if model.unavailable_features:
        missing = ", ".join(model.unavailable_features[:8])
        return result(CheckId.CPU_MODEL, ERR,
                      f"Host {host} cannot run CPU model '{cpu_model}': it lacks {missing}.",
                      "Give the VM the cluster's CPU baseline (EVC-style) and restart it.")
    return result(CheckId.CPU_MODEL, OK, f"Host {host} runs CPU model '{cpu_model}' with every feature.")


def accelerator_check(
    vm: str, accelerator: Accelerator, host: str, host_accelerator: Accelerator
) -> CheckResult:
    if host_accelerator is accelerator:
        return result(CheckId.ACCELERATOR, OK,
                      f"Host {host} uses the same accelerator ({accelerator.value}) as the VM.")
    return result(CheckId.ACCELERATOR, ERR,
                  f"VM '{vm}' runs under {accelerator.value} but host {host} uses {host_accelerator.value}.",
                  "Choose a host with the same accelerator.")


def machine_type_check(machine_type: str, host: str, machine_types: Collection[str]) -> CheckResult:
    if not machine_types:
        return result(CheckId.MACHINE_TYPE, WARN,
                      f"Host {host} reported no machine types, so '{machine_type}' could not be verified.",
                      "Refresh the host's facts.")
    if machine_type in machine_types:
        return result(CheckId.MACHINE_TYPE, OK, f"The QEMU on {host} has machine type '{machine_type}'.")
    return result(CheckId.MACHINE_TYPE, ERR, f"The QEMU on {host} lacks machine type '{machine_type}'.",
                  "Upgrade QEMU on the target or choose a host with the same QEMU version.")


def memory_check(vm: str, memory_mib: int, need_mib: int, host: str, free_mib: int) -> CheckResult:
    """``need_mib`` is the VM's memory plus QEMU's overhead (``capacity.committed_mib``)."""
    if free_mib >= need_mib:
        return result(CheckId.MEMORY, OK,
                      f"Host {host} has {free_mib} MiB free for the VM's {memory_mib} MiB.")
    return result(CheckId.MEMORY, ERR,
                  f"Host {host} has {free_mib} MiB free but VM '{vm}' needs {need_mib} MiB "
                  f"({memory_mib} MiB plus QEMU's overhead).",
                  "Free memory on the target or choose another host.")


def datastores_check(host: str, missing: Sequence[tuple[str, str]]) -> CheckResult:
    """``missing``: (disk, datastore) of each disk whose datastore the host does not see."""
    if not missing:
        return result(CheckId.DATASTORES, OK, f"Every disk's datastore is visible from {host}.")
    disk, datastore = missing[0]
    more = f" (and {len(missing) - 1} more disk(s))" if len(missing) > 1 else ""
    return result(CheckId.DATASTORES, ERR,
                  f"Datastore '{datastore}' holding {disk}{more} is not visible "
                  f"from {host}: a shared-nothing migration (moving the disks too) is needed.",
                  "Move the disks to a shared datastore first, or migrate with storage.")


def networks_check(
    vm: str, networks: Iterable[str], host: str, host_networks: Collection[str]
) -> CheckResult:
    missing = [n for n in dict.fromkeys(networks) if n not in host_networks]
    if not missing:
        return result(CheckId.NETWORKS, OK, f"Every network of the VM exists on {host}.")
    names = ", ".join(f"'{n}'" for n in missing)
    return result(CheckId.NETWORKS, ERR, f"Network {names} of VM '{vm}' does not exist on {host}.",
                  "Map the network to a bridge in the target agent's configuration.")


def concurrency_check(
    hosts: Sequence[str], running: Mapping[str, int], limits: Mapping[str, int]
) -> CheckResult:
    """``hosts``: the source and the target; ``running``: migrations per host; ``limits``: each
    host's limit (``capacity.at_limit`` decides)."""
    busy = [f"{h} ({running.get(h, 0)} of {limits.get(h, DEFAULT_MIGRATION_LIMIT)})"
            for h in at_limit(running, limits, hosts)]
    if not busy:
        return result(CheckId.CONCURRENCY, OK, "Both hosts are below their limits of concurrent migrations.")
    return result(CheckId.CONCURRENCY, WARN,
                  f"Host {' and '.join(busy)} is at its limit of concurrent migrations, "
                  "so this one will wait in the queue.",
                  "It starts when a running migration ends.")
