"""Maintenance mode through a real server and fake migrating agents (issue 11, item 5): the plan,
the refusal up front under a must rule (nothing moved), the evacuation as one parent task with a
vm.migrate child per VM, and the exit that moves the VMs back."""

from __future__ import annotations

import json
from typing import Any

from conftest import ServerHarness
from test_migrations import migration_count
from test_migrations_fakes import Pair, migrating_agents_fixture, pair_fixture  # noqa: F401
from typer.testing import CliRunner

from vmshift.cli.main import app


def host(server: ServerHarness, name: str) -> dict[str, Any]:
    body: dict[str, Any] = server.client.get(f"/hosts/{name}").json()
    return body


def test_refused_under_a_must_rule_then_evacuated_and_returned(server: ServerHarness, pair: Pair) -> None:
    plan = server.client.get("/hosts/host-1/maintenance/plan").json()
    assert plan["refused"] is None
    [move] = plan["moves"]
    assert (move["vm"], move["target"], move["live"]) == ("vm-1", "host-2", True)
    assert move["predicted_s"] > 0 and plan["predicted_total_s"] >= move["predicted_s"]

    cluster = host(server, "host-1")["cluster"]
    rule = {"name": "stay", "cluster": cluster, "kind": "vm_host_affinity", "vms": ["vm-1"],
            "hosts": ["host-1"]}
    assert server.client.post("/rules", json=rule).status_code == 201
    refused = server.client.get("/hosts/host-1/maintenance/plan").json()["refused"]
    assert refused and "Must rule stay" in refused, refused
    r = server.client.post("/hosts/host-1/maintenance/enter")
    assert r.status_code == 422 and "Must rule stay" in r.json()["error"]["message"], r.text
    assert migration_count(server) == (0, 0)
    assert host(server, "host-1")["maintenance"] is False
    r = server.client.post("/hosts/host-1/maintenance", json={"enter": True})  # the flag alone: not with VMs
    assert r.status_code == 409 and "enters maintenance mode only when empty" in r.json()["error"]["message"]

    assert server.client.delete("/rules/stay").status_code == 200
    r = server.client.post("/hosts/host-1/maintenance/enter")
    assert r.status_code == 202, r.text
    task = server.wait_task(r.json()["id"], timeout_s=60)
    assert task["state"] == "success" and task["kind"] == "host.maintenance_enter", task
    assert [m["vm"] for m in task["result"]["moved"]] == ["vm-1"]
    assert server.client.get("/vms/vm-1").json()["host"] == "host-2"
    assert host(server, "host-1")["maintenance"] is True
    children = [m["task_id"] for m in task["result"]["moved"]]
    assert [server.client.get(f"/tasks/{c}").json()["kind"] for c in children] == ["vm.migrate"]
    # placement keeps new VMs off it
    plan = server.client.get("/hosts/host-2/maintenance/plan").json()
    assert plan["refused"] and "maintenance" in plan["refused"], plan

    r = server.client.post("/hosts/host-1/maintenance/exit", json={"return_vms": True})
    assert r.status_code == 202, r.text
    task = server.wait_task(r.json()["id"], timeout_s=60)
    assert task["state"] == "success", task
    assert server.client.get("/vms/vm-1").json()["host"] == "host-1"
    assert host(server, "host-1")["maintenance"] is False


def cli(server: ServerHarness, *args: str) -> Any:
    return CliRunner().invoke(app, [*server.cli_args(), "host", "maintenance", *args])


def test_cli_dry_run_shows_the_plan_and_moves_nothing(server: ServerHarness, pair: Pair) -> None:
    result = cli(server, "enter", "host-1", "--dry-run")
    assert result.exit_code == 0, result.stdout
    assert "vm-1" in result.stdout and "host-2" in result.stdout and "live" in result.stdout
    result = cli(server, "enter", "host-1", "--dry-run", "--json")
    assert json.loads(result.stdout)["moves"][0]["target"] == "host-2"
    assert migration_count(server) == (0, 0) and host(server, "host-1")["maintenance"] is False

    result = cli(server, "enter", "host-1")
    assert result.exit_code == 0, result.stdout
    assert "Host host-1 is in maintenance mode (1 VM(s) moved away)." in result.stdout
    result = cli(server, "exit", "host-1")
    assert result.exit_code == 0 and "left maintenance mode" in result.stdout
    assert server.client.get("/vms/vm-1").json()["host"] == "host-2"  # without --return it stays
