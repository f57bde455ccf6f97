"""Pre-migration checks: a good pair of hosts passes, and every check rejects its own case."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from vmshift.migration.checks import LIVE_CHECKS, DiskView, HostView, MigrationLoad, VmView, run_checks
from vmshift.model.enums import Accelerator, BootKind, ConnectionState, PowerState
from vmshift.model.host import CpuModelInfo, DatastoreInfo, HostFacts
from vmshift.model.migration import CheckId, CheckReport, CheckSeverity
from vmshift.model.vm import BootSpec, DiskSpec, NicSpec, VmSpec


def facts(name: str, **over: Any) -> HostFacts:
    base: dict[str, Any] = dict(
        name=name,
        cpu_vendor="GenuineIntel",
        cpu_model="x",
        cpus=2,
        qemu_version="10.0.2",
        machine_types=["pc-q35-10.0", "pc-i440fx-10.0"],
        default_machine_type="pc-q35-10.0",
        cpu_models=[CpuModelInfo(name="Haswell-v4"), CpuModelInfo(name="qemu64")],
        accelerator=Accelerator.TCG,
        memory_total_mib=24000,
        memory_free_mib=20000,
        datastores=[
            DatastoreInfo(uuid="u-shared", name="shared-1", path="/ds/shared-1"),
            DatastoreInfo(uuid=f"u-local-{name}", name=f"local-{name}", path=f"/ds/local-{name}"),
        ],
        networks={"VM Network": "br0"},
        migration_address="10.213.1.11" if name == "host-1" else "10.213.1.12",
    )
    base.update(over)
    return HostFacts(**base)


VM = VmView(
    name="web",
    power_state=PowerState.POWERED_ON,
    cpu_model="Haswell-v4",
    machine_type="pc-q35-10.0",
    memory_mib=256,
    accelerator=Accelerator.TCG,
    disks=(DiskView("disk0", "shared-1"),),
    networks=("VM Network",),
)
SRC = HostView(facts("host-1"), has_certificate=True)  # both can encrypt: no encryption warning
DST = HostView(facts("host-2"), has_certificate=True)


def report(vm: VmView = VM, src: HostView = SRC, dst: HostView = DST, **kw: Any) -> CheckReport:
    return run_checks(vm, src, dst, **({"reachable": True} | kw))


def test_a_good_migration_passes_every_check_once() -> None:
    r = report()
    assert r.ok and not r.warnings and not r.must_queue
    assert [x.check for x in r.results] == list(LIVE_CHECKS)
    assert all(x.message.endswith(".") for x in r.results)


CASES: list[tuple[CheckId, Callable[[], CheckReport], str]] = [
    (CheckId.POWER_STATE, lambda: report(vm=replace(VM, power_state=PowerState.POWERED_OFF)), "poweredOff"),
    (CheckId.DIFFERENT_HOST, lambda: report(dst=SRC), "already runs on host-1"),
    (
        CheckId.SOURCE_CONNECTED,
        lambda: report(src=replace(SRC, connection=ConnectionState.DISCONNECTED)),
        "source host host-1 is disconnected",
    ),
    (
        CheckId.TARGET_CONNECTED,
        lambda: report(dst=replace(DST, connection=ConnectionState.DISCONNECTED)),
        "target host host-2 is disconnected",
    ),
    (CheckId.TARGET_MAINTENANCE, lambda: report(dst=replace(DST, maintenance=True)), "maintenance mode"),
    (
        CheckId.DATACENTER,
        lambda: report(dst=replace(DST, datacenter="Other")),
        "the target host-2 is in 'Other'",
    ),
    (
        CheckId.CPU_MODEL,
        lambda: report(
            dst=HostView(
                facts(
                    "host-2",
                    cpu_models=[CpuModelInfo(name="Haswell-v4", unavailable_features=["avx2", "fma"])],
                )
            )
        ),
        "lacks avx2, fma",
    ),
    (
        CheckId.ACCELERATOR,
        lambda: report(dst=HostView(facts("host-2", accelerator=Accelerator.KVM))),
        "runs under tcg but host host-2 uses kvm",
    ),
    (
        CheckId.MACHINE_TYPE,
        lambda: report(dst=HostView(facts("host-2", machine_types=["pc-q35-9.2"]))),
        "lacks machine type 'pc-q35-10.0'",
    ),
    (CheckId.MEMORY, lambda: report(dst=HostView(facts("host-2", memory_free_mib=300))), "has 300 MiB free"),
    (
        CheckId.DATASTORES,
        lambda: report(vm=replace(VM, disks=(DiskView("disk0", "local-host-1"),))),
        "Datastore 'local-host-1' holding disk0 is not visible from host-2: a shared-nothing migration",
    ),
    (
        CheckId.NETWORKS,
        lambda: report(vm=replace(VM, networks=("VM Network", "Storage"))),
        "Network 'Storage' of VM 'web' does not exist on host-2",
    ),
    (
        CheckId.MIGRATION_ADDRESS,
        lambda: report(dst=HostView(facts("host-2", migration_address=""))),
        "host-2 has no migration address",
    ),
    (CheckId.REACHABILITY, lambda: report(reachable=False), "cannot reach 10.213.1.12"),
    (
        CheckId.HOST_BOUND_DEVICES,
        lambda: report(vm=replace(VM, host_bound_devices=("vfio-pci 0000:03:00.0",))),
        "host-bound device(s) vfio-pci 0000:03:00.0",
    ),
]


@pytest.mark.parametrize(("check", "make", "text"), CASES, ids=[c[0].value for c in CASES])
def test_each_check_rejects_its_case_with_its_own_message(
    check: CheckId, make: Callable[[], CheckReport], text: str
) -> None:
    r = make()
    assert not r.ok
    failing = r.result(check)
    assert failing is not None and failing.severity is CheckSeverity.ERROR, r.errors
    assert text in failing.message and failing.hint
    others = [e.check for e in r.errors if e.check is not check]
    # Only checks that depend on the same fact may fail along (no address -> no reachability test).
    assert set(others) <= {CheckId.REACHABILITY}


def test_same_datastore_by_uuid_even_if_renamed_on_target() -> None:
    renamed = facts("host-2", datastores=[DatastoreInfo(uuid="u-shared", name="shared-one", path="/x")])
    assert report(dst=HostView(renamed)).result(CheckId.DATASTORES).severity is CheckSeverity.OK  # type: ignore[union-attr]


def test_concurrency_limit_queues_with_a_warning() -> None:
    r = report(load=MigrationLoad(running={"host-2": 4}, limit=4))
    assert r.ok and r.must_queue
    res = r.result(CheckId.CONCURRENCY)
    assert res is not None and res.severity is CheckSeverity.WARNING and "queue" in res.message
    assert not report(load=MigrationLoad(running={"host-2": 3}, limit=4)).must_queue


def test_unknown_reachability_and_facts_are_warnings() -> None:
    unknown = HostView(facts("host-2", cpu_models=[], machine_types=[]), has_certificate=True)
    r = report(reachable=None, dst=unknown)
    assert r.ok
    assert {w.check for w in r.warnings} == {CheckId.REACHABILITY, CheckId.CPU_MODEL, CheckId.MACHINE_TYPE}


def test_unknown_cpu_model_on_target() -> None:
    r = report(vm=replace(VM, cpu_model="EPYC-Genoa-v1"))
    res = r.result(CheckId.CPU_MODEL)
    assert res is not None and "does not know CPU model 'EPYC-Genoa-v1'" in res.message


def test_view_from_vm_spec() -> None:
    spec = VmSpec(
        name="web",
        uuid="u",
        cpus=1,
        memory_mib=256,
        cpu_model="Haswell-v4",
        machine_type="pc-q35-10.0",
        datastore="shared-1",
        disks=[DiskSpec(datastore="shared-1", file="disk0.qcow2", size_mib=64)],
        nics=[NicSpec(network="VM Network", mac="52:54:00:00:00:01")],
        boot=BootSpec(kind=BootKind.KERNEL, image="lab-guest"),
    )
    view = VmView.from_spec(spec, PowerState.POWERED_ON, Accelerator.TCG)
    assert view == VM
