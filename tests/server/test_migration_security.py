"""The migration URI the server builds and encrypted vMotion's setting (issue 9, items 2 and 3),
through a real server and fake agents that record every request."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import ServerHarness, wait_for
from sqlalchemy import create_engine, update
from test_migrations import migrate, migration_count
from test_migrations_fakes import Pair, migrating_agents_fixture, pair_fixture  # noqa: F401
from test_relocate import relocate, split_fixture  # noqa: F401
from typer.testing import CliRunner

from vmshift.cli.main import app
from vmshift.model.migration import Migration
from vmshift.server.db.schema import HostRow

OUTGOING = ("host-1", "POST", "/api/v1/migrations")


def vm_state(server: ServerHarness) -> tuple[str, str]:
    vm = server.client.get("/vms/vm-1").json()
    return vm["host"], vm["power_state"]


def issue_certificates(server: ServerHarness, *hosts: str) -> None:
    """Only ``hosts`` hold a certificate from the cluster CA (`host add` issued every host one; the
    others stand for hosts added before certificates existed)."""
    engine = create_engine(server.settings.database_url())
    try:
        with engine.begin() as conn:
            conn.execute(update(HostRow).where(HostRow.name.not_in(hosts)).values(cert_fingerprint=None))
    finally:
        engine.dispose()


def cli(server: ServerHarness, *args: str) -> tuple[int, str]:
    base = server.cli_args()
    result = CliRunner().invoke(app, [*base, *args])
    return result.exit_code, result.stdout


# ----- the URI -------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer", ["exec:touch /tmp/vmshift-owned", "file:/var/lib/vmshift/vm-1.state",
                                    "tcp:10.9.9.9:4444", "tcp:127.0.0.1:4444\n"])
def test_a_target_answering_another_uri_fails_the_migration_and_the_vm_stays_on_the_source(
        server: ServerHarness, pair: Pair, answer: str) -> None:
    src, dst = pair
    dst.answer_uri = answer
    r = migrate(server)
    assert r.status_code == 202, r.text
    task = server.wait_task(r.json()["id"])
    assert task["state"] == "error"
    m = Migration.model_validate(server.client.get(f"/migrations/{r.json()['migration_id']}").json())
    assert m.status.value == "failed" and m.error is not None
    assert m.error.message == (f"Host host-2 answered the migration URI {answer!r} instead of "
                               "'tcp:127.0.0.1:4444', so the migration stopped before the source started.")
    assert task["error"]["message"] == m.error.message
    # the source was never asked to migrate; the target was told to discard its receiving QEMU
    assert OUTGOING not in src.journal and src.outgoing == {}
    assert ("host-2", "DELETE", f"/api/v1/migrations/{m.id}") in src.journal
    assert "vm-1" not in dst.vms
    # the VM keeps running on the source, in the inventory and on the host
    assert vm_state(server) == ("host-1", "poweredOn")
    assert src.vms["vm-1"].qemu_status == "running"


def test_a_relocate_target_offering_exports_elsewhere_fails_before_the_source_starts(
        server: ServerHarness, split: Pair) -> None:
    src, dst = split
    dst.nbd_address = "10.9.9.9"
    r = relocate(server)
    assert r.status_code == 202, r.text
    task = server.wait_task(r.json()["id"])
    assert task["state"] == "error"
    assert task["error"]["message"] == ("Host host-2 answered the disk export 'nbd://10.9.9.9:10809/disk0', "
                                        "which is not on its migration address, so the migration stopped "
                                        "before the source started.")
    assert OUTGOING not in src.journal and src.outgoing == {}
    assert vm_state(server) == ("host-1", "poweredOn") and "vm-1" not in dst.vms


def test_the_server_sends_the_uri_it_built_and_the_address_it_checks_against(
        server: ServerHarness, pair: Pair) -> None:
    src, _dst = pair
    r = migrate(server)
    assert server.wait_task(r.json()["id"])["state"] == "success"
    out = src.outgoing[r.json()["migration_id"]]
    assert out.uri == "tcp:127.0.0.1:4444" and out.target_migration_address == "127.0.0.1"


# ----- encryption ----------------------------------------------------------------------------------
def test_opportunistic_without_certificates_migrates_plain_with_a_warning(
        server: ServerHarness, pair: Pair) -> None:
    src, dst = pair
    issue_certificates(server)  # neither host has one
    r = migrate(server)
    assert r.status_code == 202, r.text
    assert server.wait_task(r.json()["id"])["state"] == "success"
    m = Migration.model_validate(server.client.get(f"/migrations/{r.json()['migration_id']}").json())
    assert m.encrypted is False and m.settings.encryption.value == "opportunistic"
    assert m.checks is not None
    check = next(c for c in m.checks.results if c.check.value == "encryption")
    assert check.severity.value == "warning" and "will not be encrypted" in check.message
    events = server.client.get("/events?target=vm-1").json()
    warning = next(e for e in events if e["kind"] == "migration.unencrypted")
    assert warning["severity"] == "warning"
    assert warning["message"] == (f"Migration {m.id}: The memory stream of VM vm-1 will not be encrypted: "
                                  "host host-1 has no certificate from the cluster CA and host host-2 has "
                                  "no certificate from the cluster CA.")
    assert dst.prepared[-1].tls is None and src.outgoing[m.id].tls is None
    # the migration JSON says it
    assert server.client.get(f"/migrations/{m.id}").json()["encrypted"] is False


@pytest.mark.parametrize("where", ["vm", "request", "host"])
def test_required_toward_a_host_without_a_certificate_is_refused_before_anything_starts(
        server: ServerHarness, pair: Pair, where: str) -> None:
    src, dst = pair
    issue_certificates(server, "host-1")  # only the source has one
    body: dict[str, Any] = {}
    if where == "vm":
        assert server.client.patch("/vms/vm-1/migration-settings", json={"encryption": "required"}).is_success
    elif where == "host":
        r = server.client.patch("/hosts/host-2/migration-settings", json={"encryption": "required"})
        assert r.is_success
    else:
        body["encryption"] = "required"
    r = migrate(server, **body)
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "migration_check_failed"
    assert "host host-2 has no certificate from the cluster CA" in r.json()["error"]["message"]
    failed = [c for c in r.json()["report"]["results"] if c["severity"] == "error"]
    assert [c["check"] for c in failed] == ["encryption"]
    # nothing started: no migration, no task, no agent asked for anything
    assert migration_count(server) == (0, 0)
    assert src.journal == [] and dst.prepared == [] and src.outgoing == {}
    assert vm_state(server) == ("host-1", "poweredOn")


def test_a_request_cannot_turn_off_what_the_vm_requires(server: ServerHarness, pair: Pair) -> None:
    issue_certificates(server, "host-1", "host-2")
    server.client.patch("/vms/vm-1/migration-settings", json={"encryption": "required"})
    r = migrate(server, encryption="disabled")
    assert r.status_code == 409
    assert r.json()["error"]["message"] == ("The request asks for an unencrypted migration, but VM vm-1 "
                                            "requires encryption.")
    assert migration_count(server) == (0, 0)


def test_required_between_certified_hosts_tells_each_agent_its_peer(
        server: ServerHarness, pair: Pair) -> None:
    src, dst = pair
    issue_certificates(server, "host-1", "host-2")
    server.client.patch("/vms/vm-1/migration-settings", json={"encryption": "required"})
    r = migrate(server)
    assert r.status_code == 202, r.text
    assert server.wait_task(r.json()["id"])["state"] == "success"
    mid = r.json()["migration_id"]
    tls_in, tls_out = dst.prepared[-1].tls, src.outgoing[mid].tls
    assert tls_in is not None and tls_in.peer == "host-1"  # the target lets only the source connect
    assert tls_out is not None and tls_out.peer == "host-2"  # the source checks the target's name
    m = server.client.get(f"/migrations/{mid}").json()
    assert m["encrypted"] is True and m["settings"]["encryption"] == "required"
    assert "migration.unencrypted" not in [e["kind"] for e in server.client.get("/events?target=vm-1").json()]
    code, out = cli(server, "migration", "show", str(mid))
    assert code == 0 and "yes (TLS), setting required" in out


def test_the_source_agents_report_replaces_the_decision(server: ServerHarness, pair: Pair) -> None:
    """``encrypted`` is what the source's QEMU does, once it says (MigrationProgress.encrypted)."""
    src, _dst = pair
    src.hold = True
    r = migrate(server)
    mid = r.json()["migration_id"]
    wait_for(lambda: mid in src.progress, 10, "the source to start")
    src.progress[mid].encrypted = True  # a fake that says it encrypts although the server did not ask
    wait_for(lambda: server.client.get(f"/migrations/{mid}").json()["encrypted"] is True, 10, "the report")
    src.hold = False
    assert server.wait_task(r.json()["id"])["state"] == "success"


# ----- settings --------------------------------------------------------------------------------------
def test_the_encryption_settings_round_trip_and_keep_the_other_fields(
        server: ServerHarness, pair: Pair) -> None:
    r = server.client.patch("/vms/vm-1/migration-settings", json={"encryption": "required"})
    assert r.status_code == 200 and r.json() == {"max_downtime_ms": 500, "allow_postcopy": False,
                                                  "encryption": "required"}
    r = server.client.patch("/vms/vm-1/migration-settings", json={"max_downtime_ms": 900})
    assert r.json()["encryption"] == "required" and r.json()["max_downtime_ms"] == 900
    r = server.client.patch("/vms/vm-1/migration-settings", json={"encryption": "sometimes"})
    assert r.status_code == 422
    assert server.client.patch("/vms/vm-1/migration-settings", json={}).json()["encryption"] == "required"

    r = server.client.patch("/hosts/host-2/migration-settings", json={"encryption": "disabled"})
    assert r.status_code == 200 and r.json()["encryption"] == "disabled" and r.json()["migration_limit"] == 4
    assert server.client.patch("/hosts/host-2/migration-settings", json={"migration_limit": 2}).json()[
        "encryption"] == "disabled"

    # the CLI shows and sets the same fields
    code, out = cli(server, "vm", "migration-settings", "vm-1", "--encryption", "opportunistic", "--json")
    assert code == 0 and json.loads(out)["encryption"] == "opportunistic"
    code, out = cli(server, "host", "migration-settings", "host-2", "--encryption", "required")
    assert code == 0 and "required" in out
    code, out = cli(server, "host", "migration-settings", "host-2", "--encryption", "maybe")
    assert code != 0
    assert server.client.patch("/hosts/host-2/migration-settings", json={}).json()["encryption"] == "required"


def test_the_cli_override_reaches_the_checks(server: ServerHarness, pair: Pair) -> None:
    issue_certificates(server)  # neither host has one
    code, out = cli(server, "vm", "migrate", "vm-1", "--host", "host-2", "--encryption", "required",
                    "--check-only")
    assert code == 1 and "requires encryption" in out
    code, out = cli(server, "vm", "migrate", "vm-1", "--host", "host-2", "--encryption", "disabled", "--json")
    assert code == 0, out
    m = json.loads(out)
    assert m["encrypted"] is False and m["settings"]["encryption"] == "disabled"
    assert "migration.unencrypted" not in [e["kind"] for e in server.client.get("/events?target=vm-1").json()]
