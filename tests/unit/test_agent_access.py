"""Who may call which agent route (agent/access.py), enrollment checks (pki.check_issued), the
agent config without a token, and the per-migration grant's lifetime."""

from __future__ import annotations

import datetime as dt
import json
import stat
from pathlib import Path

import pytest

from vmshift.agent.access import PEER_ROUTES, RouteCall, decide
from vmshift.agent.config import config_from_dict, load_config
from vmshift.agent.migration_store import MigrationRole, MigrationStore, StoredMigration
from vmshift.errors import InvalidInputError
from vmshift.migration.grants import GRANT_MARGIN_S, grant_lifetime_s, mint_grant
from vmshift.model.agent_migration import PeerGrant
from vmshift.model.migration import MigrationSettings
from vmshift.tls import pki
from vmshift.tls.peer import PeerIdentity

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
SERVER = PeerIdentity(pki.Role.SERVER, pki.SERVER_NAME, "SHA256:00")
HOST1 = PeerIdentity(pki.Role.HOST, "host-1", "SHA256:01")
HOST3 = PeerIdentity(pki.Role.HOST, "host-3", "SHA256:03")
ACTIVATE = RouteCall("POST", "/api/v1/migrations/{migration_id}/activate", 7)
CAP = "k" * 43


def _grants(peer: str = "host-1", expires: dt.datetime = NOW + dt.timedelta(minutes=5),
            ) -> dict[int, PeerGrant]:
    return {7: PeerGrant(peer=peer, capability=CAP, expires_at=expires)}


def test_the_server_may_call_everything() -> None:
    for call in (RouteCall("GET", "/api/v1/vms"), RouteCall("DELETE", "/api/v1/vms/{name}"), ACTIVATE,
                 RouteCall("POST", "/api/v1/tls/csr")):
        assert decide(SERVER, call, None, {}, NOW) is None


def test_no_certificate_or_a_bootstrap_one_is_refused() -> None:
    refusal = decide(None, RouteCall("GET", "/api/v1/vms"), None, {}, NOW)
    assert refusal is not None and refusal.status == 403 and refusal.hint
    boot = PeerIdentity(pki.Role.BOOTSTRAP, "host-1", "SHA256:02")
    refusal = decide(boot, ACTIVATE, CAP, _grants(), NOW)
    assert refusal is not None and "vmshift-bootstrap" in refusal.message


def test_a_host_with_the_grant_may_call_only_the_migrations_routes() -> None:
    assert decide(HOST1, ACTIVATE, CAP, _grants(), NOW) is None
    for method, route in PEER_ROUTES:
        assert decide(HOST1, RouteCall(method, route, 7 if "{migration_id}" in route else None), CAP,
                      _grants(), NOW) is None
    for call in (RouteCall("GET", "/api/v1/vms"), RouteCall("PUT", "/api/v1/vms/{name}"),
                 RouteCall("POST", "/api/v1/migrations"), RouteCall("POST", "/api/v1/migrations/incoming"),
                 RouteCall("DELETE", "/api/v1/migrations/{migration_id}/grant", 7),
                 RouteCall("PUT", "/api/v1/tls/cert")):
        refusal = decide(HOST1, call, CAP, _grants(), NOW)
        assert refusal is not None and refusal.status == 403 and call.route in refusal.message


@pytest.mark.parametrize(("peer", "capability", "grants", "when", "words"), [
    (HOST1, None, _grants(), NOW, "no migration capability"),
    (HOST1, "x" * 43, _grants(), NOW, "no live grant for migration 7"),
    (HOST3, CAP, _grants(), NOW, "no live grant"),  # another host with a stolen capability
    (HOST1, CAP, {}, NOW, "no live grant"),  # the migration ended: its grant is gone
    (HOST1, CAP, _grants(), NOW + dt.timedelta(minutes=6), "expired"),
])
def test_a_host_without_a_live_grant_of_its_own_is_refused(
    peer: PeerIdentity, capability: str | None, grants: dict[int, PeerGrant], when: dt.datetime, words: str
) -> None:
    refusal = decide(peer, ACTIVATE, capability, grants, when)
    assert refusal is not None and refusal.status == 403 and words in refusal.message and refusal.hint


def test_a_grant_is_for_its_migration_only() -> None:
    other = RouteCall("POST", "/api/v1/migrations/{migration_id}/activate", 8)
    assert decide(HOST1, other, CAP, _grants(), NOW) is not None
    health = RouteCall("GET", "/api/v1/health")  # names no migration: any live grant of this host
    assert decide(HOST1, health, CAP, _grants(), NOW) is None
    assert decide(HOST3, health, CAP, _grants(), NOW) is not None


def test_check_issued_accepts_only_the_pending_keys_certificate_from_its_ca() -> None:
    ca, other_ca = pki.create_ca(), pki.create_ca()
    req = pki.make_key_and_csr("host-1")
    cert = pki.issue(ca, req.cert_pem, common_name="host-1", role=pki.Role.HOST, sans=["10.0.0.1"])
    got = pki.check_issued(cert, req.key_pem, ca.cert_pem, common_name="host-1")
    assert got.common_name == "host-1" and got.role is pki.Role.HOST
    with pytest.raises(InvalidInputError, match="not for the key"):
        pki.check_issued(cert, pki.make_key_and_csr("host-1").key_pem, ca.cert_pem, common_name="host-1")
    with pytest.raises(InvalidInputError, match="not signed by"):
        pki.check_issued(cert, req.key_pem, other_ca.cert_pem, common_name="host-1")
    with pytest.raises(InvalidInputError, match="not vmshift-host 'host-2'"):
        pki.check_issued(cert, req.key_pem, ca.cert_pem, common_name="host-2")
    server_cert = pki.issue(ca, req.cert_pem, common_name="host-1", role=pki.Role.SERVER, sans=[])
    with pytest.raises(InvalidInputError, match="names vmshift-server"):
        pki.check_issued(server_cert, req.key_pem, ca.cert_pem, common_name="host-1")


BASE = {"name": "host-1", "listen": "10.0.0.1:8101", "state_dir": "/var/lib/vmshift-agent",
        "ca_file": "/etc/vmshift/ca.pem"}


def test_agent_config_needs_the_ca_and_refuses_the_old_token(tmp_path: Path) -> None:
    assert config_from_dict(BASE).ca_file == Path("/etc/vmshift/ca.pem")
    with pytest.raises(InvalidInputError, match="'ca_file' must be"):
        config_from_dict({k: v for k, v in BASE.items() if k != "ca_file"})
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({**BASE, "token_file": "/etc/vmshift/agent-token"}))
    with pytest.raises(InvalidInputError, match="'token_file' is gone") as exc:
        load_config(path)
    assert "ca_file" in exc.value.message and exc.value.hint


def test_grant_lives_for_the_migrations_timeout_plus_a_margin() -> None:
    settings = MigrationSettings(timeout_s_per_gib=60, timeout_min_s=60)
    assert grant_lifetime_s(settings, 512 << 20) == 60 + GRANT_MARGIN_S  # the minimum
    assert grant_lifetime_s(settings, 4 << 30) == 240 + GRANT_MARGIN_S
    a, b = mint_grant("host-1", 100, NOW), mint_grant("host-1", 100, NOW)
    assert a.peer == "host-1" and a.expires_at == NOW + dt.timedelta(seconds=100)
    assert a.capability != b.capability and len(a.capability) >= 43


def test_migration_records_are_private(tmp_path: Path) -> None:
    store = MigrationStore(tmp_path / "state")
    store.save(StoredMigration(role=MigrationRole.TARGET, migration_id=3, vm="web",
                               grant=PeerGrant(peer="host-1", capability=CAP, expires_at=NOW)))
    assert stat.S_IMODE(store.path(3).stat().st_mode) == 0o600
    assert stat.S_IMODE(store.dir.stat().st_mode) == 0o700
    loaded = store.load(3)
    assert loaded is not None and loaded.grant is not None and loaded.grant.capability == CAP
