"""Issue 11, end to end: three busy VMs started on host-1 of a 3-host lab are spread by fully
automated DRS, each move a verified live migration; with the load steady, ten more passes make no
move; a must anti-affinity rule between two of them holds from the first pass on.

It runs in the session's 3-host lab (the 2-host one has too few hosts). The VMs are small
(128 MiB, memtest over 8 MiB flat out: TCG migrates slowly here) and the test calls `drs run`
rather than waiting for the periodic pass.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab.helpers import LabHandle, guest_check, vmshift, vmshift_json, wait_for
from tests.lab.vmotion import layout, verify_guest
from vmshift.client import VmshiftClient
from vmshift.lab.probe import tcp_hold_process

pytestmark = pytest.mark.lab

VMS = ["busy-1", "busy-2", "busy-3"]
APART = ("busy-1", "busy-2")  # the must anti-affinity rule's VMs


@pytest.fixture(scope="module", autouse=True)
def leave_lab3_as_found(lab3: LabHandle, api3: VmshiftClient) -> Iterator[None]:
    """The 3-host lab is the session's: its VMs and rule go, DRS goes back to its defaults."""
    yield
    cluster = api3.get_host("host-1")["cluster"]
    api3.set_cluster_drs(cluster, automation="partially", threshold=3)
    if any(r["name"] == "apart" for r in api3.list_rules(cluster)):
        api3.delete_rule("apart", cluster)
    for name in VMS:
        vmshift(lab3, "vm", "stop", name, check=False)
        vmshift(lab3, "vm", "delete", name, check=False)


def create_busy(lab: LabHandle, name: str) -> dict[str, Any]:
    return dict(vmshift_json(
        lab, "vm", "create", name, "--host", "host-1", "--cpus", "1", "--memory", "128",
        "--datastore", "shared-1", "--network", "VM Network", "--disk", "64M", "--image", "lab-guest",
        "--kernel-args", "vmshift.memtest=8,0 vmshift.disklog=1", "--start",
    ))


def pass_now(api: VmshiftClient, cluster: str) -> dict[str, Any]:
    """One pass through the API (as `vmshift drs run` does), its result."""
    task = api.wait_task(api.run_drs(cluster)["id"], timeout=120)
    assert task["state"] == "success", task
    result: dict[str, Any] = task["result"]
    return result


def stamp(t0: float, what: str) -> None:
    print(f"{time.monotonic() - t0:6.1f} s  {what}", flush=True)


def hosts_of(api: VmshiftClient) -> dict[str, str]:
    return {vm: api.get_vm(vm)["host"] for vm in VMS}


def applied(api: VmshiftClient, cluster: str) -> list[dict[str, Any]]:
    """Every recommendation DRS applied, by any pass (the server's periodic pass may run between
    ours), each once its migration ended."""
    recs = api.drs_recommendations(cluster, ["applied"])
    for rec in recs:
        task = api.wait_task(rec["task_id"], timeout=300)
        assert task["state"] == "success", (task.get("error"), api.get_migration(rec["migration_id"]))
    return recs


def test_fully_automated_drs_spreads_busy_vms_then_holds_still(lab3: LabHandle, api3: VmshiftClient) -> None:
    t0 = time.monotonic()
    lay = layout(lab3)
    vms = {name: create_busy(lab3, name) for name in VMS}
    cluster = api3.get_host("host-1")["cluster"]
    # Threshold 5 (tolerance 0.02): the lab's three hosts share this machine's two cores (and other
    # tests' guests), so a VM flat out gets 0.2 to 0.6 of the 2 cores each host reports; at
    # threshold 3 (tolerance 0.1) two of them on one host of three can count as in balance. Once
    # they are one per host no move can lower the objective, whatever the threshold.
    api3.set_cluster_drs(cluster, automation="fully", threshold=5)
    api3.add_rule("apart", cluster, "vm_anti_affinity", list(APART), strength="must")
    before = {v: guest_check(lab3, v) for v in VMS}  # each guest answers: a TCP hold can connect
    stamp(t0, "VMs up")
    holds = {name: tcp_hold_process(lay.client_ns, vm["ip"]) for name, vm in vms.items()}
    try:
        # the agents measure each QEMU's CPU time per stats interval: wait until they report it
        wait_for("each VM's load reported", lambda: all(
            (api3.get_vm(v).get("stats") or {}).get("cpu_cores", 0) > 0.2 for v in VMS), timeout=60)
        stamp(t0, "loads reported")
        for _ in range(2):  # spread within two passes
            result = vmshift_json(lab3, "drs", "run", cluster, timeout=120)
            moved = applied(api3, cluster)
            where = hosts_of(api3)
            assert where[APART[0]] != where[APART[1]], (where, result)  # mended in the first pass
            stamp(t0, f"pass: {where} {result['notes']}")
        assert sorted(where.values()) == ["host-1", "host-2", "host-3"], (where, moved)
        assert len(moved) == 2 and {r["source_host"] for r in moved} == {"host-1"}, moved
        assert "must_rule" in {r["reason"] for r in moved} <= {"must_rule", "balance"}, moved
        for rec in moved:
            m = api3.get_migration(rec["migration_id"])
            assert m["status"] == "completed" and m["kind"] == "live", m
            verify_guest(lab3, api3, rec["vm"], rec["target_host"], before[rec["vm"]])
        stamp(t0, "moves verified")

        for i in range(10):  # steady load: no further move, the rule still holds
            result = pass_now(api3, cluster)
            assert result["recommendations"] == [], (i, result)
            assert result["notes"], result  # it says why not
        assert hosts_of(api3) == where and len(applied(api3, cluster)) == 2
        stamp(t0, "ten passes, no move")
    finally:
        reports = {name: h.stop() for name, h in holds.items()}
    for name, report in reports.items():
        assert report["survived"], f"{name}'s TCP connection broke: {report}"
    assert "drs.pass" in [e["kind"] for e in api3.list_events(50, cluster)]
