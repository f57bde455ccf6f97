"""DRS through a real server (SQLite or PostgreSQL) and fake agents that stream their load: cluster
and VM settings, the load history, passes on demand, recommendations listed, applied and dismissed,
fully automated moves started as ordinary migrations, what-ifs, and the CLI (issue 11)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from conftest import ServerHarness, wait_for
from sqlalchemy import select
from test_migrations_fakes import MigratingAgent, start_vm
from typer.testing import CliRunner
from vmshift_fake_agent import UvicornThread, make_facts

from vmshift.cli.main import app
from vmshift.server.core import ServerCore
from vmshift.server.db.schema import HostLoadRow, utcnow
from vmshift.server.load_history import HostSample, record

BUSY = 0.9  # cores busy, of each fake host's 2


@pytest.fixture(name="hosts")
def hosts_fixture(server: ServerHarness) -> Iterator[list[MigratingAgent]]:
    """host-1..3 that stream (so the server hears their load), sharing datastore shared-1."""
    running: list[UvicornThread] = []
    agents: list[MigratingAgent] = []
    for i in (1, 2, 3):
        agent = MigratingAgent(facts=make_facts(f"host-{i}"), stream=True)
        agent.thread = UvicornThread(agent.app(), tls=agent.tls).start()
        running.append(agent.thread)
        agents.append(agent)
        server.add_host(agent.thread)
    for a in agents[1:]:
        a.journal = agents[0].journal
    yield agents
    for t in running:
        t.stop(force=True)


def core_of(server: ServerHarness) -> ServerCore:
    assert server._app is not None
    core: ServerCore = server._app.state.core
    return core


def cluster_of(server: ServerHarness) -> str:
    name: str = server.client.get("/hosts/host-1").json()["cluster"]
    return name


def busy_vms_on_host1(server: ServerHarness, agents: list[MigratingAgent], names: list[str]) -> None:
    """Start the VMs on host-1 and make the agents report them busy (a stats report from each)."""
    for name in names:
        start_vm(server, name)
    for a in agents:
        a.loads = dict.fromkeys(names, BUSY)
    core = core_of(server)

    def heard() -> bool:
        samples = core.heartbeat.load_samples()
        if len(samples) != len(agents):
            return False
        vms = samples["host-1"].vms
        return all(n in vms and vms[n][0] == BUSY for n in names)  # the busy numbers, not earlier ones

    wait_for(heard, 10, "every host's load report, host-1's with its VMs")


def run(server: ServerHarness, cluster: str) -> dict[str, Any]:
    r = server.client.post(f"/clusters/{cluster}/drs/run")
    assert r.status_code == 202, r.text
    task = server.wait_task(r.json()["id"])
    assert task["state"] == "success", task
    result: dict[str, Any] = task["result"]
    return result


def cli(server: ServerHarness, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [*server.cli_args(), *args])
    return result.exit_code, result.stdout + (result.stderr if result.stderr_bytes is not None else "")


def test_cluster_and_vm_drs_settings_and_their_errors(
        server: ServerHarness, hosts: list[MigratingAgent]) -> None:
    cluster = cluster_of(server)
    got = server.client.get(f"/clusters/{cluster}/drs").json()
    assert (got["automation"], got["threshold"]) == ("partially", 3)  # the defaults
    r = server.client.patch(f"/clusters/{cluster}/drs", json={"automation": "fully", "threshold": 4})
    assert r.status_code == 200 and (r.json()["automation"], r.json()["threshold"]) == ("fully", 4)
    for body in ({"threshold": 6}, {"threshold": 0}, {"automation": "sometimes"}, {"other": 1}):
        assert server.client.patch(f"/clusters/{cluster}/drs", json=body).status_code == 422, body
    assert server.client.patch("/clusters/nope/drs", json={"threshold": 2}).status_code == 404
    got = server.client.get(f"/clusters/{cluster}/drs").json()
    assert (got["automation"], got["threshold"]) == ("fully", 4)  # nothing changed by the refusals

    start_vm(server, "vm-1")
    r = server.client.patch("/vms/vm-1/drs", json={"drs": "disabled"})
    assert r.status_code == 200 and r.json() == {"vm": "vm-1", "drs": "disabled"}
    assert server.client.patch("/vms/vm-1/drs", json={"drs": "never"}).status_code == 422
    assert server.client.patch("/vms/ghost/drs", json={"drs": "manual"}).status_code == 404

    code, out = cli(server, "cluster", "set", cluster, "--drs", "manual", "--drs-threshold", "2", "--json")
    assert code == 0, out
    assert json.loads(out) == {"cluster": cluster, "automation": "manual", "threshold": 2}
    code, out = cli(server, "cluster", "set", cluster, "--drs-threshold", "9")
    assert code != 0
    code, out = cli(server, "vm", "set", "vm-1", "--drs", "fully", "--json")
    assert code == 0 and json.loads(out)["drs"] == "fully", out


def test_load_history_keeps_one_row_per_host_per_step_for_the_window(
        server: ServerHarness, hosts: list[MigratingAgent]) -> None:
    busy_vms_on_host1(server, hosts, ["vm-1"])
    core = core_of(server)
    sessions = server.sessions()
    with sessions.begin() as s:  # an old sample, from before the window
        old = utcnow() - timedelta(hours=1)
        record(s, {"host-2": HostSample(2, 2048, {"vm-x": [1.0, 10.0]})}, old, window_s=7200)
    run(server, cluster_of(server))  # a pass samples the hosts first
    with sessions() as s:
        rows = s.execute(select(HostLoadRow.host_id, HostLoadRow.cpus, HostLoadRow.memory_total_mib,
                                HostLoadRow.vms)).all()
    assert len(rows) == 3  # the old one went: one per host now
    by_vms = [r for r in rows if "vm-1" in r.vms]
    assert len(by_vms) == 1 and by_vms[0].vms["vm-1"][0] == BUSY
    assert {(r.cpus, r.memory_total_mib) for r in rows} == {(2, 2048)}
    assert core.load_sampler.settings.window_s == 300.0
    assert server.client.get("/vms/vm-1").json()["stats"]["cpu_cores"] == BUSY  # shown live too


def test_manual_cluster_lists_recommendations_to_apply_or_dismiss(
        server: ServerHarness, hosts: list[MigratingAgent]) -> None:
    cluster = cluster_of(server)
    server.client.patch(f"/clusters/{cluster}/drs", json={"automation": "manual"})
    busy_vms_on_host1(server, hosts, ["vm-1", "vm-2", "vm-3"])

    first = run(server, cluster)
    assert first["recommendations"] == [] and first["applied"] == []
    assert any("not yet acted on" in n for n in first["notes"]), first["notes"]
    second = run(server, cluster)
    recs = second["recommendations"]
    assert sorted(r["target_host"] for r in recs) == ["host-2", "host-3"], second
    assert second["applied"] == [] and all(r["state"] == "pending" for r in recs)
    assert all(r["source_host"] == "host-1" and r["reason"] == "balance" and r["benefit"] > r["cost"] > 0
               and r["predicted_s"] > 0 for r in recs)
    listed = server.client.get(f"/drs/recommendations?cluster={cluster}").json()
    assert [r["id"] for r in listed] == [r["id"] for r in recs]
    third = run(server, cluster)  # the same moves again: the same ids stay pending
    assert [r["id"] for r in third["recommendations"]] == [r["id"] for r in recs]

    keep, drop = recs
    r = server.client.post(f"/drs/recommendations/{drop['id']}/dismiss")
    assert r.status_code == 200 and r.json()["state"] == "dismissed"
    assert server.client.post(f"/drs/recommendations/{drop['id']}/dismiss").status_code == 409
    assert server.client.post("/drs/recommendations/9999/apply").status_code == 404

    hosts[0].peer = next(a for a in hosts if a.facts.name == keep["target_host"])
    r = server.client.post(f"/drs/recommendations/{keep['id']}/apply")
    assert r.status_code == 200, r.text
    applied = r.json()
    assert applied["state"] == "applied" and applied["migration_id"] is not None
    assert server.wait_task(applied["task_id"])["state"] == "success"
    assert server.client.get(f"/vms/{keep['vm']}").json()["host"] == keep["target_host"]
    again = server.client.post(f"/drs/recommendations/{keep['id']}/apply")
    assert again.status_code == 409 and "applied" in again.json()["error"]["message"]
    kinds = [e["kind"] for e in server.client.get(f"/events?target={keep['vm']}").json()]
    assert "drs.applied" in kinds
    assert "drs.pass" in [e["kind"] for e in server.client.get(f"/events?target={cluster}").json()]

    code, out = cli(server, "drs", "recommendations", cluster, "--all", "--json")
    assert code == 0, out
    states = {r["id"]: r["state"] for r in json.loads(out)}
    assert (states[keep["id"]], states[drop["id"]]) == ("applied", "dismissed")
    code, out = cli(server, "drs", "run", cluster, "-q")
    assert code == 0 and "DRS pass of cluster" in out, out


def test_fully_automated_cluster_moves_through_the_migration_path_then_holds_still(
        server: ServerHarness, hosts: list[MigratingAgent]) -> None:
    cluster = cluster_of(server)
    server.client.patch(f"/clusters/{cluster}/drs", json={"automation": "fully"})
    server.client.delete("/hosts/host-3")  # two hosts: the fake source hands its VMs to one peer
    hosts[0].peer = hosts[1]
    busy_vms_on_host1(server, hosts[:2], ["vm-1", "vm-2"])
    assert run(server, cluster)["applied"] == []
    second = run(server, cluster)
    assert len(second["applied"]) == 1, second
    rec = second["recommendations"][0]
    assert (rec["state"], rec["source_host"], rec["target_host"]) == ("applied", "host-1", "host-2")
    assert server.wait_task(rec["task_id"])["state"] == "success"
    migration = server.client.get(f"/migrations/{rec['migration_id']}").json()
    assert migration["status"] == "completed" and migration["vm"] == rec["vm"]
    for _ in range(3):  # balanced now (and the moved VM is in its cooldown): no further move
        later = run(server, cluster)
        assert later["recommendations"] == [], later
    code, out = cli(server, "drs", "run", cluster, "--json")
    assert code == 0 and json.loads(out)["recommendations"] == [], out


def test_simulate_a_host_removed_or_a_vm_added(server: ServerHarness, hosts: list[MigratingAgent]) -> None:
    cluster = cluster_of(server)
    busy_vms_on_host1(server, hosts, ["vm-1", "vm-2"])
    r = server.client.post(f"/clusters/{cluster}/drs/simulate", json={"remove_host": "host-1"})
    assert r.status_code == 200, r.text
    assert sorted(r.json()["placed"]) == ["vm-1", "vm-2"]
    assert set(r.json()["placed"].values()) == {"host-2", "host-3"}
    r = server.client.post(f"/clusters/{cluster}/drs/simulate", json={"add_vm": "new-1:1:256:0.5"})
    assert r.status_code == 200 and r.json()["placed"]["new-1"] in ("host-2", "host-3"), r.text
    for body, status in (({}, 422), ({"remove_host": "host-1", "add_vm": "a:1:1"}, 422),
                         ({"add_vm": "bad spec"}, 422), ({"remove_host": "host-9"}, 400)):
        assert server.client.post(f"/clusters/{cluster}/drs/simulate", json=body).status_code == status, body
    assert server.client.post("/clusters/nope/drs/simulate", json={"remove_host": "h"}).status_code == 404
    code, out = cli(server, "drs", "simulate", cluster, "--remove-host", "host-1")
    assert code == 0 and "vm-1 ->" in out, out
    code, out = cli(server, "drs", "simulate", cluster)
    assert code != 0
    # nothing moved or stored
    assert [v["host"] for v in server.client.get("/vms").json()] == ["host-1", "host-1"]
    assert server.client.get("/drs/recommendations").json() == []
