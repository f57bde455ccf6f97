"""Issue 11: maintenance mode in a real 3-host lab, every moved guest verified.

The session's 3-host lab and three small guests, all on host-1. First a must VM-host rule ties one
guest to host-1: entering maintenance is refused with the rule's name and nothing moves. Then
without the rule: host-1 ends empty and in maintenance mode, each guest runs on another host with
its memory pattern and disk log intact, and a TCP connection to one of them survives its move.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab.helpers import LabHandle, guest_check, vmshift, vmshift_json, wait_for
from tests.lab.vmotion import layout, verify_guest
from vmshift.client import VmshiftClient
from vmshift.lab.probe import tcp_hold_process

pytestmark = pytest.mark.lab

GUESTS = ("evac-a", "evac-b", "evac-c")


@pytest.fixture(scope="module")
def guests(lab3: LabHandle, api3: VmshiftClient) -> Iterator[dict[str, dict[str, Any]]]:
    vms = {}
    for name in GUESTS:
        vms[name] = dict(vmshift_json(
            lab3, "vm", "create", name, "--host", "host-1", "--cpus", "1", "--memory", "128",
            "--datastore", "shared-1", "--network", "VM Network", "--disk", "16M", "--image", "lab-guest",
            "--kernel-args", "vmshift.memtest=16,10 vmshift.disklog=1", "--start",
        ))
    for name in GUESTS:
        guest_check(lab3, name)
    yield vms
    # the 3-host lab is the session's: leave it as found
    if api3.get_host("host-1")["maintenance"]:
        vmshift(lab3, "host", "maintenance", "exit", "host-1")
    for name in GUESTS:
        vmshift(lab3, "vm", "stop", name, check=False)
        vmshift(lab3, "vm", "delete", name, check=False)


def where(api: VmshiftClient) -> dict[str, str]:
    return {name: api.get_vm(name)["host"] for name in GUESTS}


def test_a_must_rule_refuses_maintenance_before_anything_moves(
    lab3: LabHandle, api3: VmshiftClient, guests: dict[str, Any]
) -> None:
    cluster = api3.get_host("host-1")["cluster"]
    vmshift(lab3, "rule", "add", "a-on-1", "--cluster", cluster, "--kind", "vm_host_affinity",
            "--vm", "evac-a", "--host", "host-1")
    try:
        proc = vmshift(lab3, "host", "maintenance", "enter", "host-1", check=False)
        assert proc.returncode != 0, proc.stdout
        shown = proc.stderr + proc.stdout
        assert "Must rule a-on-1 keeps VM 'evac-a' off" in shown, shown
        assert where(api3) == dict.fromkeys(GUESTS, "host-1")
        assert [m for m in api3.list_migrations() if m["vm"] in GUESTS] == []
        assert api3.get_host("host-1")["maintenance"] is False
    finally:
        vmshift(lab3, "rule", "delete", "a-on-1")


def test_enter_evacuates_host_1_with_every_guest_verified(
    lab3: LabHandle, api3: VmshiftClient, guests: dict[str, Any]
) -> None:
    plan = vmshift_json(lab3, "host", "maintenance", "enter", "host-1", "--dry-run")
    assert sorted(m["vm"] for m in plan["moves"]) == sorted(GUESTS) and plan["refused"] is None
    assert {m["target"] for m in plan["moves"]} <= {"host-2", "host-3"}
    before = {name: guest_check(lab3, name) for name in GUESTS}
    hold = tcp_hold_process(layout(lab3).client_ns, guests["evac-a"]["ip"])
    try:
        wait_for("the TCP hold to connect", lambda: guest_check(lab3, "evac-a")["echo"], timeout=30)
        proc = vmshift(lab3, "host", "maintenance", "enter", "host-1", "--json", timeout=600)
    finally:
        report = hold.stop()
    out = json.loads(proc.stdout)
    assert out["task"]["state"] == "success" and out["host"]["maintenance"] is True, out
    placed = where(api3)
    assert set(placed.values()) <= {"host-2", "host-3"} and len(set(placed.values())) == 2, placed
    assert report["survived"], f"the TCP connection to evac-a broke: {report}"
    for name in GUESTS:
        verify_guest(lab3, api3, name, placed[name], before[name])
    moves = [m for m in api3.list_migrations() if m["vm"] in GUESTS]
    assert len(moves) == 3 and all(m["status"] == "completed" and m["kind"] == "live" for m in moves), moves
