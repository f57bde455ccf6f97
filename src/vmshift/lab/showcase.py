"""The vMotion demo: migrate a VM away and back while a client talks to it, and measure what it felt.

For each leg it keeps a TCP echo connection and a 1 ms UDP echo probe running from the lab's client
namespace, migrates through the server API, then verifies the guest (two more memtest passes with no
mismatch). QEMU's downtime alone hides what users feel (FACTS.md), hence the UDP gap beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from vmshift.client import VmshiftClient
from vmshift.errors import LabError, VmshiftError
from vmshift.lab.lab import check, get, require_root, vm_ip
from vmshift.lab.probe import tcp_hold_process, udp_probe_process
from vmshift.model.migration import MigrationStatus

Progress = Callable[[str], None]


def _wait_migration(api: VmshiftClient, migration_id: int, progress: Progress) -> dict[str, Any]:
    last = ""
    while True:
        m = api.get_migration(migration_id)
        live = m.get("progress") or {}
        line = f"{m['phase']} round {live.get('round', 0)}"
        if line != last:
            progress(line)
            last = line
        if MigrationStatus(m["status"]).finished:
            return m
        time.sleep(0.3)


def _memtest_after_two_passes(lab: str, vm: str, timeout_s: float = 120.0) -> dict[str, Any]:
    start = check(lab, vm, wait_s=30)
    deadline = time.monotonic() + timeout_s
    while True:
        now = check(lab, vm, wait_s=30)
        if now["memtest"]["passes"] >= start["memtest"]["passes"] + 2 or time.monotonic() > deadline:
            return now
        time.sleep(1.0)


def round_trip(lab: str, vm: str, progress: Progress = lambda _: None) -> list[dict[str, Any]]:
    """Migrate `vm` to another host and back; one result row per leg."""
    require_root()
    rec = get(lab)
    if not rec.server_url or not rec.token:
        raise LabError(f"Lab {lab!r} has no server running.", hint=f"Run 'vmshift lab up --name {lab}'.")
    ns, ip = rec.layout.client_ns, vm_ip(rec, vm)
    rows: list[dict[str, Any]] = []
    with VmshiftClient(rec.server_url, rec.token) as api:
        home = api.get_vm(vm)["host"]
        away = next((h["name"] for h in api.list_hosts() if h["name"] != home), None)
        if away is None:
            raise LabError("The demo needs a second host.", hint="Bring the lab up with --hosts 2.")
        for source, target in ((home, away), (away, home)):
            progress(f"{vm}: {source} -> {target}")
            hold = tcp_hold_process(ns, ip)
            udp = udp_probe_process(ns, ip)
            try:
                started = api.migrate_vm(vm, target)
                m = _wait_migration(api, int(started["migration_id"]), progress)
            finally:
                time.sleep(0.5)  # let the probes see the guest answer again after the switchover
                tcp_report, udp_report = hold.stop(), udp.stop()
            if m["status"] != MigrationStatus.COMPLETED:
                err = (m.get("error") or {}).get("message", "no reason given")
                raise VmshiftError(f"Migration {source} -> {target} of {vm} ended {m['status']}: {err}")
            guest = _memtest_after_two_passes(lab, vm)
            rows.append({
                "vm": vm, "source": source, "target": target, "migration_id": m["id"],
                "total_ms": m["total_ms"], "downtime_ms": m["downtime_ms"],
                "predicted_total_ms": m["predicted_total_ms"],
                "predicted_downtime_ms": m["predicted_downtime_ms"],
                "rounds": m["rounds"], "bytes_sent": m["bytes_sent"],
                "udp_max_gap_ms": udp_report["max_gap_ms"], "udp_lost": udp_report["lost"],
                "tcp_kept": bool(tcp_report["survived"]),
                "memtest_mismatches": guest["memtest"]["mismatches"],
                "disklog_durable_seq": guest["disklog"]["durable_seq"],
            })
    return rows
