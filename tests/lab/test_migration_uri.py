"""Issue 9, item 3, with real agents and QEMU: the source agent refuses any migration URI but
``tcp:`` to the target's migration address (400, before QEMU is touched; the VM keeps running),
and a migration through the server uses the URI the server built from the port the real target
reported, plain with a warning while the hosts have no certificates.

One small VM (1 vCPU, 128 MiB, memtest and disklog) on host-1 of the session lab; deleted at the end.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.lab.helpers import LabHandle, guest_check, qemu_pids, vmshift, vmshift_json, wait_for
from tests.lab.vmotion import layout, migrate, verify_guest
from vmshift.client import VmshiftClient
from vmshift.lab import processes

pytestmark = pytest.mark.lab
VM = "urivm"


def agent(lab: LabHandle, k: int) -> httpx.Client:
    """host-k's agent API as the server reaches it (its certificate)."""
    return processes.agent_http(layout(lab), k)


@pytest.fixture(scope="module")
def urivm(lab: LabHandle, api: VmshiftClient) -> Iterator[dict[str, Any]]:
    vm = dict(vmshift_json(
        lab, "vm", "create", VM, "--host", "host-1", "--cpus", "1", "--memory", "128",
        "--datastore", "shared-1", "--network", "VM Network", "--disk", "16M", "--image", "lab-guest",
        "--kernel-args", "vmshift.memtest=16,10 vmshift.disklog=1", "--start",
    ))  # fmt: skip
    guest_check(lab, VM)
    try:
        yield vm
    finally:
        vmshift(lab, "vm", "stop", VM, check=False)
        vmshift(lab, "vm", "delete", VM, check=False)
        wait_for(f"{VM} to leave the inventory", lambda: VM not in [v["name"] for v in api.list_vms()],
                 timeout=60)  # fmt: skip


def running_on_host1(lab: LabHandle) -> dict[str, Any]:
    with agent(lab, 1) as a:
        rt: dict[str, Any] = a.get(f"/vms/{VM}").json()
    assert rt["power_state"] == "poweredOn" and rt["qemu_status"] == "running", rt
    return rt


def test_the_source_agent_refuses_every_uri_but_tcp_to_the_targets_migration_address(
        lab: LabHandle, urivm: dict[str, Any]) -> None:
    lay = layout(lab)
    before = running_on_host1(lab)
    marker = Path(f"/tmp/vmshift-{lab.name}-{secrets.token_hex(4)}")
    target = lay.host_mig_address(2)
    refused = [
        f"exec:touch {marker}",
        f"file:{marker}",
        f"unix:{marker}",
        "fd:3",
        f"tcp:{lay.host_mig_address(1)}:4444",  # a real address, but not the target's
        f"tcp:{target}:4444\n",
        "tcp:localhost:4444",
    ]
    with agent(lab, 1) as a:
        for mid, uri in enumerate(refused, start=900_001):
            body = {"migration_id": mid, "vm": VM, "uri": uri, "target_migration_address": target,
                    "target_agent": {"address": lay.agent_address(2), "capability": "c" * 43}}
            r = a.post("/migrations", json=body)
            assert r.status_code == 400, (uri, r.text)
            error = r.json()["error"]
            assert error["code"] == "invalid_migration_uri" and repr(uri) in error["message"], error
            # no record: the request never became a migration
            assert a.get(f"/migrations/{mid}").status_code == 404
    assert not marker.exists(), "QEMU ran the exec: command"
    # the VM runs on, the same QEMU, untouched
    after = running_on_host1(lab)
    assert after["pid"] == before["pid"] and qemu_pids(urivm["uuid"]) == [before["pid"]]
    assert guest_check(lab, VM)["echo"]


def test_a_required_encrypted_migration_through_the_server_runs_over_tls(
        lab: LabHandle, api: VmshiftClient, urivm: dict[str, Any]) -> None:
    """The lab's hosts hold the certificates `host add` issued them: a VM that requires encryption
    moves over TLS, the server built the URI, and no plain-stream warning is recorded."""
    settings = vmshift_json(lab, "vm", "migration-settings", VM, "--encryption", "required")
    assert settings["encryption"] == "required"
    before = guest_check(lab, VM)
    m = migrate(lab, VM, "host-2")
    assert m["status"] == "completed", m.get("error")
    assert m["encrypted"] is True and m["settings"]["encryption"] == "required"
    check = next(c for c in m["checks"]["results"] if c["check"] == "encryption")
    assert check["severity"] == "ok", check
    kinds = [e["kind"] for e in api.list_events(limit=200, target=VM)]
    assert "migration.unencrypted" not in kinds
    verify_guest(lab, api, VM, "host-2", before)
