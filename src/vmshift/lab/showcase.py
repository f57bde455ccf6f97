"""The vMotion demo: migrate a VM away and back while a client talks to it, and measure what it felt.

For each leg it keeps a TCP echo connection and a 1 ms UDP echo probe running from the lab's client
namespace, migrates through the server API, then verifies the guest (two more memtest passes with no
mismatch). QEMU's downtime alone hides what users feel (FACTS.md), hence the UDP gap beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vmshift.client import VmshiftClient
from vmshift.errors import LabError, VmshiftError
from vmshift.lab.lab import check, get, require_root, vm_ip, wait_memtest_passes
from vmshift.lab.probe import tcp_hold_process, udp_probe_process
from vmshift.model.migration import MigrationStatus

Progress = Callable[[str], None]


def _phase_lines(progress: Progress) -> Callable[[dict[str, Any]], None]:
    """A task watcher that reports each new phase of the migration task once."""
    last = ""

    def show(task: dict[str, Any]) -> None:
        nonlocal last
        line = str(task.get("phase") or task["state"])
        if line != last:
            progress(line)
            last = line

    return show


def round_trip(lab: str, vm: str, progress: Progress = lambda _: None) -> list[dict[str, Any]]:
    """Migrate `vm` to another host and back; one result row per leg."""
    require_root()
    rec = get(lab)
    if not rec.server_url or not rec.token:
        raise LabError(f"Lab {lab!r} has no server running.", hint=f"Run 'vmshift lab up --name {lab}'.")
    ns, ip = rec.layout.client_ns, vm_ip(rec, vm)
    rows: list[dict[str, Any]] = []
    with VmshiftClient(rec.server_url, rec.token, ca_file=rec.ca_file) as api:
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
                api.wait_task(started["id"], on_update=_phase_lines(progress))
                m = api.get_migration(int(started["migration_id"]))
                if m["status"] == MigrationStatus.COMPLETED:  # the guest answers from its new host
                    arrived = check(lab, vm, wait_s=30)  # before the probes stop
            finally:
                tcp_report, udp_report = hold.stop(), udp.stop()
            if m["status"] != MigrationStatus.COMPLETED:
                err = (m.get("error") or {}).get("message", "no reason given")
                raise VmshiftError(f"Migration {source} -> {target} of {vm} ended {m['status']}: {err}")
            guest = wait_memtest_passes(lab, vm, arrived["memtest"]["passes"] + 2)
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
