"""Issue 3: pre-migration checks in a real lab, one case each, each with its own message.

Cases the lab's identical hosts cannot stage (CPU model, machine type, memory, networks, datacenter,
host-bound devices) are covered by the pure check tests in tests/unit/test_migration_checks.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab.helpers import LabHandle, guest_check, vmshift, vmshift_json, wait_for
from tests.lab.vmotion import layout
from vmshift.client import VmshiftClient
from vmshift.lab import processes
from vmshift.lab.topology import set_migration_link

pytestmark = pytest.mark.lab


def create(lab: LabHandle, name: str, datastore: str = "shared-1", start: bool = True) -> dict[str, Any]:
    args = ["vm", "create", name, "--host", "host-1", "--cpus", "1", "--memory", "128",
            "--datastore", datastore, "--network", "VM Network", "--disk", "16M", "--image", "lab-guest",
            "--kernel-args", "vmshift.disklog=1"]
    return dict(vmshift_json(lab, *args, *(["--start"] if start else [])))


@pytest.fixture(scope="module")
def checked(lab: LabHandle) -> Iterator[dict[str, Any]]:
    vm = create(lab, "checked")
    guest_check(lab, "checked")
    yield vm
    vmshift(lab, "vm", "stop", "checked", check=False)
    vmshift(lab, "vm", "delete", "checked", check=False)


def check_only(lab: LabHandle, vm: str, host: str) -> tuple[int, list[dict[str, Any]], str]:
    proc = vmshift(lab, "vm", "migrate", vm, "--host", host, "--check-only", "--json", check=False)
    data = json.loads(proc.stdout) if proc.stdout.strip() else {}
    report = data.get("checks", data) if isinstance(data, dict) else {}
    results = report.get("results", []) if isinstance(report, dict) else []
    return proc.returncode, results, proc.stderr


def errors_of(results: list[dict[str, Any]]) -> dict[str, str]:
    return {r["check"]: r["message"] for r in results if r["severity"] == "error"}


def assert_rejected(lab: LabHandle, api: VmshiftClient, vm: str, host: str, check: str, needle: str) -> None:
    placed = api.get_vm(vm)["host"]
    rc, results, stderr = check_only(lab, vm, host)
    assert rc != 0, f"--check-only must exit non-zero when {check} fails"
    errors = errors_of(results)
    assert check in errors, f"expected an error from check {check}, got {errors} {stderr}"
    assert needle.lower() in errors[check].lower(), errors[check]
    # a real migrate is refused with the same message, and nothing changes
    proc = vmshift(lab, "vm", "migrate", vm, "--host", host, check=False)
    assert proc.returncode != 0 and needle.lower() in proc.stderr.lower(), proc.stderr
    assert api.get_vm(vm)["host"] == placed


def test_all_checks_pass_for_a_good_target(lab: LabHandle, checked: dict[str, Any]) -> None:
    rc, results, stderr = check_only(lab, "checked", "host-2")
    assert rc == 0, stderr
    assert results and not errors_of(results)


def test_a_powered_off_vm_is_offered_a_cold_move(lab: LabHandle, api: VmshiftClient) -> None:
    """Not a live migration: the checks of a cold move (docs/moves.md), nothing started."""
    create(lab, "cold-1", start=False)
    try:
        rc, results, stderr = check_only(lab, "cold-1", "host-2")
        assert rc == 0 and not errors_of(results), stderr
        kind = next(r for r in results if r["check"] == "kind")
        assert "cold move" in kind["message"]
        assert api.get_vm("cold-1")["host"] == "host-1" and api.list_migrations(vm="cold-1") == []
    finally:
        vmshift(lab, "vm", "delete", "cold-1", check=False)


def test_same_host(lab: LabHandle, api: VmshiftClient, checked: dict[str, Any]) -> None:
    assert_rejected(lab, api, "checked", "host-1", "kind", "nothing to move")


def test_target_in_maintenance(lab: LabHandle, api: VmshiftClient, checked: dict[str, Any]) -> None:
    vmshift(lab, "host", "maintenance", "enter", "host-2")
    try:
        assert_rejected(lab, api, "checked", "host-2", "target_maintenance", "maintenance")
    finally:
        vmshift(lab, "host", "maintenance", "exit", "host-2")


def test_target_disconnected(lab: LabHandle, api: VmshiftClient, checked: dict[str, Any]) -> None:
    processes.stop_agent(lab.name, "host-2")
    try:
        wait_for("host-2 to be disconnected",
                 lambda: api.get_host("host-2")["connection_state"] == "disconnected", timeout=60)
        assert_rejected(lab, api, "checked", "host-2", "target_connected", "host-2")
    finally:
        processes.ensure_agent(lab.name, "host-2")
        wait_for("host-2 to reconnect",
                 lambda: api.get_host("host-2")["connection_state"] == "connected", timeout=60)


def test_datastore_not_visible_from_target(lab: LabHandle, api: VmshiftClient) -> None:
    create(lab, "local-1", datastore="local-host-1")
    try:
        assert_rejected(lab, api, "local-1", "host-2", "datastores", "shared-nothing")
    finally:
        vmshift(lab, "vm", "stop", "local-1", check=False)
        vmshift(lab, "vm", "delete", "local-1", check=False)


def test_migration_network_unreachable(lab: LabHandle, api: VmshiftClient, checked: dict[str, Any]) -> None:
    lay = layout(lab)
    set_migration_link(lay, 2, False)
    try:
        assert_rejected(lab, api, "checked", "host-2", "reachability", "reach")
    finally:
        set_migration_link(lay, 2, True)


def test_dry_run_predicts_and_changes_nothing(
    lab: LabHandle, api: VmshiftClient, checked: dict[str, Any]
) -> None:
    out = vmshift_json(lab, "vm", "migrate", "checked", "--host", "host-2", "--dry-run")
    prediction = out.get("prediction", out)
    assert prediction["total_ms"] > 0 and prediction["downtime_ms"] >= 0
    assert prediction["bandwidth_bps"] > 0 and prediction["memory_bytes"] >= 128 << 20
    assert api.get_vm("checked")["host"] == "host-1"


