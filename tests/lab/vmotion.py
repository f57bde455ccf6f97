"""Helpers for vMotion lab tests: start a migration, wait for it, verify the guest afterwards."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from tests.lab.helpers import LabHandle, guest_check, qemu_pids, vmshift, vmshift_json, wait_for
from vmshift.client import VmshiftClient
from vmshift.lab.lab import memtest_swept_since
from vmshift.lab.layout import LabLayout, load_record


def layout(lab: LabHandle) -> LabLayout:
    rec = load_record(lab.name)
    assert rec is not None
    return rec.layout


def migrate(lab: LabHandle, vm: str, host: str, *extra: str, timeout: float = 600) -> dict[str, Any]:
    """`vmshift vm migrate VM --host HOST --json`: the finished migration record."""
    return dict(vmshift_json(lab, "vm", "migrate", vm, "--host", host, *extra, timeout=timeout))


def start_migration(lab: LabHandle, vm: str, host: str, *extra: str) -> int:
    """Start a migration without waiting; return its id."""
    out = vmshift_json(lab, "vm", "migrate", vm, "--host", host, "--no-wait", *extra)
    mid = out.get("migration_id") or (out.get("migration") or {}).get("id") or out.get("id")
    assert mid is not None, f"no migration id in {out}"
    return int(mid)


def wait_migration_phase(
    api: VmshiftClient, mid: int, phases: set[str], timeout: float = 120
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        m = api.get_migration(mid)
        moving = (m.get("progress") or {}).get("transferred_bytes", 0) > 0
        if m["phase"] in phases and (m["phase"] != "precopy" or moving):
            return m
        assert m["status"] not in ("failed", "cancelled", "completed"), f"migration ended early: {m}"
        return None

    return wait_for(f"migration {mid} to reach {phases}", reached, timeout=timeout, interval=0.2)


def wait_migration_end(api: VmshiftClient, mid: int, timeout: float = 300) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        m = api.get_migration(mid)
        return m if m["status"] in ("completed", "failed", "cancelled") else None

    return wait_for(f"migration {mid} to end", ended, timeout=timeout, interval=0.3)


def host_of_pid(lab: LabHandle, pid: int) -> str:
    out = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True, check=True)
    ns = out.stdout.strip()
    prefix = f"vms-{lab.name}-"
    assert ns.startswith(prefix), f"QEMU {pid} runs outside the lab's host namespaces ({ns!r})"
    return ns.removeprefix(prefix)


def verify_guest(
    lab: LabHandle, api: VmshiftClient, vm: str, host: str, before: dict[str, Any]
) -> dict[str, Any]:
    """After a migration: one QEMU on `host`, the VM running there, memory and disk intact."""
    info = api.get_vm(vm)
    assert info["host"] == host, f"inventory says {info['host']}, expected {host}"
    assert info["power_state"] == "poweredOn"
    pids = qemu_pids(info["uuid"])
    assert len(pids) == 1, f"expected exactly one QEMU for {vm}, found {pids}"
    assert host_of_pid(lab, pids[0]) == host
    start = guest_check(lab, vm)
    # memtest verifies a page only when its sweep reaches it: judge once it has checked every page
    # since now (lab.memtest_swept_since).
    after = wait_for(
        f"a full memtest sweep in {vm}",
        lambda: c if memtest_swept_since(start["memtest"], (c := guest_check(lab, vm))["memtest"]) else None,
        timeout=120,
    )
    assert after["echo"] is True
    assert after["memtest"]["mismatches"] == 0, after
    assert after["disklog"]["durable_seq"] > before["disklog"]["durable_seq"], (before, after)
    assert after["disklog"].get("errors", 0) == 0, after
    return after


def fdb_port_of(lab: LabHandle, mac: str) -> str | None:
    lay = layout(lab)
    out = subprocess.run(
        ["ip", "netns", "exec", lay.switch_ns, "bridge", "-j", "fdb", "show", "br", "brvm"],
        capture_output=True, text=True, check=True,
    ).stdout
    for entry in json.loads(out or "[]"):
        if entry.get("mac", "").lower() == mac.lower() and "self" not in entry.get("flags", []):
            return str(entry.get("ifname"))
    return None


__all__ = ["fdb_port_of", "host_of_pid", "layout", "migrate", "start_migration",
           "verify_guest", "vmshift", "wait_migration_end", "wait_migration_phase"]
