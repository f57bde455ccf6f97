"""Benchmark set-up: the inventory rows of the VMs simulated hosts report, written straight into the
server's database through its own schema module (server/db/schema.py).

Simulated VMs are not created through the API (there is no QEMU to start), so without rows the
server's reconcile would call every one of them an orphan. Seeding them makes the inventory what it
would be after the VMs had been created on those hosts. Only benchmarks and simulator tests use this.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import CursorResult, delete, insert, select
from sqlalchemy.orm import Session

from vmshift.hostsim.fleet import (
    SHARED_DATASTORE,
    SIM_CPU_MODEL,
    SIM_IMAGE,
    SIM_MACHINE_TYPE,
    vm_memory_mib,
    vm_name,
    vm_uuid,
)
from vmshift.model.enums import BootKind, PowerState
from vmshift.model.vm import BootSpec, VmSpec
from vmshift.server.db.schema import HostRow, VmRow


def vm_rows(host_id: int, host: str, indexes: range, power_state: PowerState) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for i in indexes:
        name = vm_name(host, i)
        spec = VmSpec(name=name, uuid=vm_uuid(name), cpus=2, memory_mib=vm_memory_mib(name),
                      cpu_model=SIM_CPU_MODEL, machine_type=SIM_MACHINE_TYPE, datastore=SHARED_DATASTORE,
                      boot=BootSpec(kind=BootKind.KERNEL, image=SIM_IMAGE))
        rows.append({"name": name, "uuid": spec.uuid, "host_id": host_id,
                     "spec": spec.model_dump(mode="json"), "power_state": power_state,
                     "image": SIM_IMAGE, "kernel_args": "", "stats": {}})
    return rows


def seed_vms(s: Session, hosts: list[str], indexes: range,
             power_state: PowerState = PowerState.POWERED_ON) -> int:
    """Insert the rows of VMs ``indexes`` of each host in ``hosts`` (already added); how many.

    Seeded powered off, VMs a host reports running are adopted as powered on by the next heartbeat
    (one event each), with no reconcile finding in between; seeded powered on, the host must
    already report them, or reconcile finds them missing."""
    ids = dict(s.execute(select(HostRow.name, HostRow.id).where(HostRow.name.in_(hosts))).all())
    missing = sorted(set(hosts) - set(ids))
    if missing:
        raise ValueError(f"hosts {missing} are not in the inventory: add them before seeding their VMs")
    rows = [r for h in hosts for r in vm_rows(ids[h], h, indexes, power_state)]
    for start in range(0, len(rows), 1000):
        s.execute(insert(VmRow), rows[start:start + 1000])
    return len(rows)



def remove_vms(s: Session, hosts: list[str], indexes: range) -> int:
    """Delete the rows ``seed_vms`` wrote (of VMs the hosts no longer report); how many."""
    names = [vm_name(h, i) for h in hosts for i in indexes]
    removed = 0
    for start in range(0, len(names), 1000):
        result = s.execute(delete(VmRow).where(VmRow.name.in_(names[start:start + 1000])))
        removed += cast(CursorResult[Any], result).rowcount
    return removed
