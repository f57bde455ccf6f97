"""Affinity rules through a real server (SQLite or PostgreSQL) and fake agents: the API, the CLI, and
the placement snapshot the server builds from its inventory (issue 11)."""

from __future__ import annotations

import json
from typing import Any

from conftest import ServerHarness
from test_migrations_fakes import Pair, migrating_agents_fixture, pair_fixture  # noqa: F401
from typer.testing import CliRunner

from vmshift.cli.main import app
from vmshift.model.placement import RuleKind, RuleStrength
from vmshift.server.db.schema import ClusterRow, HostRow
from vmshift.server.placement_inputs import cluster_snapshot


def cluster_of(server: ServerHarness, host: str = "host-1") -> str:
    name: str = server.client.get(f"/hosts/{host}").json()["cluster"]
    return name


def add(server: ServerHarness, **body: Any) -> Any:
    body.setdefault("cluster", cluster_of(server))
    body.setdefault("kind", "vm_host_affinity")
    body.setdefault("vms", ["vm-1"])
    return server.client.post("/rules", json=body)


def test_rules_are_added_listed_by_cluster_and_deleted(server: ServerHarness, pair: Pair) -> None:
    cluster = cluster_of(server)
    r = add(server, name="vm1-on-1", hosts=["host-1"])
    assert r.status_code == 201, r.text
    got = r.json()
    assert (got["cluster"], got["kind"], got["strength"], got["vms"], got["hosts"]) == \
        (cluster, "vm_host_affinity", "must", ["vm-1"], ["host-1"])
    assert add(server, name="apart", kind="vm_anti_affinity", strength="should").status_code == 201
    listed = server.client.get(f"/rules?cluster={cluster}").json()
    assert [x["name"] for x in listed] == ["apart", "vm1-on-1"]
    assert server.client.get("/rules?cluster=nope").status_code == 404

    gone = server.client.delete("/rules/vm1-on-1")
    assert gone.status_code == 200 and gone.json()["name"] == "vm1-on-1"
    assert [x["name"] for x in server.client.get("/rules").json()] == ["apart"]
    r = server.client.delete("/rules/vm1-on-1")
    assert r.status_code == 404 and "apart" in r.json()["error"]["hint"]
    kinds = [e["kind"] for e in server.client.get(f"/events?target={cluster}").json()]
    assert "rule.created" in kinds and "rule.deleted" in kinds


def test_bad_rules_are_refused_with_a_reason_and_nothing_added(server: ServerHarness, pair: Pair) -> None:
    assert add(server, name="r1", hosts=["host-1"]).status_code == 201
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"name": "r1", "hosts": ["host-1"]}, 409, "has a rule named r1"),
        ({"name": "r2"}, 400, "names no host"),  # a VM-host rule without hosts (placement's Rule says so)
        ({"name": "r3", "kind": "vm_affinity", "hosts": ["host-1"]}, 400, "takes no hosts"),
        ({"name": "r4", "vms": ["ghost"], "hosts": ["host-1"]}, 404, "ghost"),
        ({"name": "r5", "hosts": ["host-9"]}, 404, "host-9"),
        ({"name": "r6", "cluster": "nope", "hosts": ["host-1"]}, 404, "nope"),
        ({"name": "r7", "vms": []}, 422, ""),
        ({"name": "r8", "kind": "sometimes", "hosts": ["host-1"]}, 422, ""),
    ]
    for body, status, words in cases:
        r = add(server, **body)
        assert r.status_code == status, (body, r.text)
        assert words in r.json()["error"]["message"], (body, r.text)
    assert [x["name"] for x in server.client.get("/rules").json()] == ["r1"]


def cli(server: ServerHarness, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [*server.cli_args(), *args])
    return result.exit_code, result.stdout


def test_cli_rule_add_list_delete(server: ServerHarness, pair: Pair) -> None:
    cluster = cluster_of(server)
    code, out = cli(server, "rule", "add", "keep", "--cluster", cluster, "--kind", "vm_host_anti_affinity",
                    "--vm", "vm-1", "--host", "host-2", "--strength", "should", "--json")
    assert code == 0, out
    assert json.loads(out)["hosts"] == ["host-2"]
    code, out = cli(server, "rule", "list", "--cluster", cluster)
    assert code == 0 and "keep" in out and "vm_host_anti_affinity" in out
    code, out = cli(server, "rule", "add", "bad", "--cluster", cluster, "--kind", "vm_host_affinity",
                    "--vm", "vm-1")
    assert code != 0
    code, out = cli(server, "rule", "delete", "keep", "--json")
    assert code == 0 and json.loads(out)["name"] == "keep"
    code, out = cli(server, "rule", "list", "--json")
    assert code == 0 and json.loads(out) == []


def test_the_snapshot_holds_the_clusters_hosts_vms_and_rules(server: ServerHarness, pair: Pair) -> None:
    assert add(server, name="on-1", hosts=["host-1"]).status_code == 201
    with server.sessions()() as s:
        host = s.query(HostRow).filter_by(name="host-1").one()
        cluster = s.get(ClusterRow, host.cluster_id)
        assert cluster is not None
        snap = cluster_snapshot(s, cluster, now_s=100.0)
    assert [h.name for h in snap.hosts] == ["host-1", "host-2"]
    assert all(h.usable and "shared-1" in h.datastores and "VM Network" in h.networks for h in snap.hosts)
    vm = snap.vm("vm-1")
    assert (vm.host, vm.memory_mib, vm.powered_on, vm.migrating_to) == ("host-1", 256, True, None)
    assert "shared-1" in vm.datastores and vm.networks == {"VM Network"}
    assert [(r.name, r.kind, r.strength, r.hosts) for r in snap.rules] == \
        [("on-1", RuleKind.VM_HOST_AFFINITY, RuleStrength.MUST, {"host-1"})]
    assert snap.now_s == 100.0
