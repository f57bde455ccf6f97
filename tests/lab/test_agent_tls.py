"""Issue 9: the agents' mutual TLS in the lab. Only the server's certificate may call an agent; a
host's certificate may call another host's agent only for a migration the server authorised, with
that migration's capability, and not after it ended; `host add` refuses an unconfirmed certificate.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.lab.helpers import BIN, LabHandle, guest_check, vmshift, vmshift_json, wait_for
from tests.lab.vmotion import layout, start_migration, verify_guest, wait_migration_end, wait_migration_phase
from vmshift.client import VmshiftClient
from vmshift.lab import processes
from vmshift.tls import pki
from vmshift.tls.contexts import client_context, unverified_context
from vmshift.tls.files import HostTlsFiles, ServerTlsFiles, write_private
from vmshift.tls.peer import CAPABILITY_HEADER

pytestmark = pytest.mark.lab
VM = "tlsmover"


def _get(address: str, path: str, verify: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    with httpx.Client(verify=verify, trust_env=False, timeout=10) as http:
        return http.get(f"https://{address}/api/v1{path}", headers=headers or {})


def _as_host(lab: LabHandle, k: int) -> Any:
    """host-k's own identity, from the files in its state directory (what a compromised host holds)."""
    files = HostTlsFiles.of(layout(lab).agent_state_dir(k))
    assert files.enrolled, "the lab's host add should have issued the host its certificate"
    return client_context(files.ca_cert, cert=files.cert, key=files.key)


def test_the_agent_refuses_clients_without_the_servers_certificate(lab: LabHandle, tmp_path: Path) -> None:
    lay = layout(lab)
    server = ServerTlsFiles.of(lay.server_dir)
    address = lay.agent_address(1)
    # the server's certificate: answered, and the agent is verified against the cluster CA
    ok = _get(address, "/vms", client_context(server.ca_cert, cert=server.cert, key=server.key))
    assert ok.status_code == 200, ok.text
    # no client certificate: the handshake fails before any HTTP
    with pytest.raises(httpx.HTTPError):
        _get(address, "/vms", client_context(server.ca_cert))
    # a certificate of another CA claiming to be the server: refused too
    forged = pki.issue_with_key(pki.create_ca(), common_name=pki.SERVER_NAME, role=pki.Role.SERVER, sans=[])
    write_private(tmp_path / "forged.pem", forged.cert_pem)
    write_private(tmp_path / "forged-key.pem", forged.key_pem)
    with pytest.raises(httpx.HTTPError):
        _get(address, "/vms",
             unverified_context(cert=tmp_path / "forged.pem", key=tmp_path / "forged-key.pem"))


def test_a_hosts_certificate_cannot_call_another_hosts_agent(lab: LabHandle, api: VmshiftClient) -> None:
    lay = layout(lab)
    r = _get(lay.agent_address(2), "/vms", _as_host(lab, 1))
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert err["code"] == "forbidden" and "host-1" in err["message"] and err["hint"]
    # nor a migration route without a grant the server gave
    r = _get(lay.agent_address(2), "/migrations/999/incoming", _as_host(lab, 1),
             {CAPABILITY_HEADER: "x" * 43})
    assert r.status_code == 403 and "no live grant" in r.json()["error"]["message"]
    # the server sees the hosts' issued certificates
    for host in api.list_hosts():
        assert host["cert_fingerprint"].startswith("SHA256:") and host["cert_not_after"]


@pytest.fixture
def mover(lab: LabHandle) -> Iterator[dict[str, Any]]:
    vm = dict(vmshift_json(
        lab, "vm", "create", VM, "--host", "host-1", "--cpus", "1", "--memory", "128",
        "--datastore", "shared-1", "--network", "VM Network", "--disk", "64M", "--image", "lab-guest",
        "--kernel-args", "vmshift.memtest=8,2 vmshift.disklog=1", "--start",
    ))
    guest_check(lab, VM)
    yield vm
    vmshift(lab, "vm", "stop", VM, check=False)
    vmshift(lab, "vm", "delete", VM, check=False)


def test_the_migration_capability_admits_the_source_only_until_the_migration_ends(
    lab: LabHandle, api: VmshiftClient, mover: dict[str, Any]
) -> None:
    lay = layout(lab)
    before = guest_check(lab, VM)
    mid = start_migration(lab, VM, "host-2", "--bandwidth-limit", "100mbit")  # slow enough to look at
    wait_migration_phase(api, mid, {"precopy"})
    record = json.loads((lay.agent_state_dir(1) / "migrations" / f"{mid}.json").read_text())
    capability = record["request"]["target_agent"]["capability"]
    assert (lay.agent_state_dir(1) / "migrations" / f"{mid}.json").stat().st_mode & 0o077 == 0
    target = lay.agent_address(2)
    with_cap = {CAPABILITY_HEADER: capability}
    # during the migration host-1 may read its state on the target, with the capability only
    r = _get(target, f"/migrations/{mid}/incoming", _as_host(lab, 1), with_cap)
    assert r.status_code == 200 and r.json()["vm"] == VM, r.text
    assert _get(target, f"/migrations/{mid}/incoming", _as_host(lab, 1)).status_code == 403
    assert _get(target, "/vms", _as_host(lab, 1), with_cap).status_code == 403  # nothing else
    m = wait_migration_end(api, mid)
    assert m["status"] == "completed", m.get("error")
    verify_guest(lab, api, VM, "host-2", before)
    # the migration ended: the same call with the same capability is refused
    r = _get(target, f"/migrations/{mid}/incoming", _as_host(lab, 1), with_cap)
    assert r.status_code == 403 and "no live grant" in r.json()["error"]["message"], r.text


def _agent_fingerprint(config: Path) -> str:
    """What an operator runs on the host: `vmshift-agent --config FILE fingerprint`."""
    return subprocess.run([str(BIN / "vmshift-agent"), "--config", str(config), "fingerprint"],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def extra_agent(lab: LabHandle) -> Iterator[str]:
    """A third, not yet added agent in host-2's namespace (its own state, no datastores)."""
    lay = layout(lab)
    address = f"{lay.host_mgmt_address(2)}:8199"
    state = lay.lab_dir / "extra-agent"
    config = lay.lab_dir / "extra-agent.json"
    config.write_text(json.dumps({
        "name": "tls-extra", "listen": address, "state_dir": str(state),
        "ca_file": str(ServerTlsFiles.of(lay.server_dir).ca_cert), "networks": {},
        "management_address": lay.host_mgmt_address(2), "accelerator": "tcg",
    }))
    log = lay.log_file("extra-agent")
    with open(log, "ab") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", lay.host_ns(2), str(BIN / "vmshift-agent"),
                                 "--config", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        server = ServerTlsFiles.of(lay.server_dir)
        processes.wait_http(f"https://{address}/api/v1/health", None, proc, log, "extra agent",
                            verify=unverified_context(cert=server.cert, key=server.key))
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_host_add_needs_the_agents_confirmed_fingerprint(
    lab: LabHandle, api: VmshiftClient, extra_agent: str
) -> None:
    lay = layout(lab)
    printed = _agent_fingerprint(lay.lab_dir / "extra-agent.json")
    hosts_before = sorted(h["name"] for h in api.list_hosts())
    # the API: no fingerprint, or a wrong one -> 409 with the agent's fingerprint, nothing added
    with httpx.Client(base_url=f"{lab.server}/api/v1", headers={"Authorization": f"Bearer {lab.token}"},
                      trust_env=False, timeout=60, verify=lab.tls()) as http:
        for body in ({"address": extra_agent},
                     {"address": extra_agent, "fingerprint": pki.fingerprint(b"\x00" * 32)}):
            r = http.post("/hosts", json=body)
            assert r.status_code == 409, r.text
            assert r.json()["fingerprint"] == printed
    assert sorted(h["name"] for h in api.list_hosts()) == hosts_before
    # the CLI without a terminal refuses and says what to pass
    refused = vmshift(lab, "host", "add", extra_agent, "--json", check=False)
    said = "".join((refused.stdout + refused.stderr).split())  # the console wraps long lines
    assert refused.returncode != 0 and "--fingerprint" in said and printed in said
    assert sorted(h["name"] for h in api.list_hosts()) == hosts_before
    # confirmed: added with an issued certificate, which the agent serves from then on
    added = vmshift_json(lab, "host", "add", extra_agent, "--fingerprint", printed)
    try:
        assert added["name"] == "tls-extra" and added["cert_fingerprint"] != printed
        assert _agent_fingerprint(lay.lab_dir / "extra-agent.json") == added["cert_fingerprint"]
        rotated = vmshift_json(lab, "host", "rotate-cert", "tls-extra")
        assert rotated["cert_fingerprint"] not in (printed, added["cert_fingerprint"])
        beat = rotated["last_heartbeat"]
        wait_for("a heartbeat over the rotated certificate",
                 lambda: (h := api.get_host("tls-extra"))["last_heartbeat"] != beat
                 and h["connection_state"] == "connected", timeout=30)
    finally:
        vmshift(lab, "host", "remove", "tls-extra", check=False)
