"""`make bench-encryption`: what an encrypted migration stream costs against a plain one.

    .venv/bin/python -m bench.encryption [--runs 3] [--guests demo,1g] [--link 1gbit] [--out bench/results]

One lab of two hosts, its migration link shaped to ``--link`` (default 1 Gbit/s; ``none``: unshaped),
each host given its cluster certificate (vmshift.lab.certs). For each guest, ``--runs`` pairs of
migrations back and forth at the agent level, plain and encrypted alternating (so drift in the
machine's load hits both alike): total time, bytes sent, throughput, downtime, and the CPU seconds
the source and target QEMU spent. Guests: ``demo`` (256 MiB, memtest 64 MiB at 50 MiB/s, as
scripts/demo.sh) and ``1g`` (1 GiB, memtest 512 MiB at 30 MiB/s: half a GiB of distinct pages to send).
Each guest is verified after each migration (memtest clean, disk log going on). Writes
``encryption-latest.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from bench.suite.observe import say
from bench.suite.run import machine

from vmshift.lab import certs, processes, topology
from vmshift.lab import lab as labmod
from vmshift.lab.layout import LabRecord
from vmshift.migration.grants import mint_grant

Json = dict[str, Any]
MIB = 1 << 20


@dataclass(frozen=True)
class Guest:
    key: str
    name: str
    memory_mib: int
    memtest: str

    @property
    def title(self) -> str:
        return f"{self.memory_mib} MiB guest, memtest {self.memtest} (MiB, MiB/s)"


GUESTS = {
    "demo": Guest("demo", "enc-demo", 256, "64,50"),
    "1g": Guest("1g", "enc-1g", 1024, "512,30"),
}


class Agents:
    """The lab's agents as its server reaches them (the server's certificate)."""

    def __init__(self, rec: LabRecord) -> None:
        self.rec = rec

    def client(self, k: int) -> httpx.Client:
        return processes.agent_http(self.rec.layout, k, timeout=120)


def wait(what: str, probe: Any, timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def healthy(rec: LabRecord, vm: str) -> Json | None:
    c = labmod.check(rec.name, vm)
    return c if c.get("echo") and c.get("memtest") and c.get("disklog") else None


def create(rec: LabRecord, g: Guest) -> None:
    body = {"name": g.name, "host": "host-1", "cpus": 1, "memory_mib": g.memory_mib, "datastore": "shared-1",
            "disks_mib": [64], "kernel_args": f"vmshift.memtest={g.memtest} vmshift.disklog=1", "start": True}
    with httpx.Client(base_url=f"{rec.server_url}/api/v1", trust_env=False, timeout=120,
                      headers={"Authorization": f"Bearer {rec.token}"}, verify=rec.server_tls()) as s:
        r = s.post("/vms", json=body)
        r.raise_for_status()
    wait(f"{g.name} to answer", lambda: healthy(rec, g.name), timeout=300, interval=1)
    labmod.wait_memtest_passes(rec.name, g.name, 1, timeout_s=300)


def spec(rec: LabRecord, vm: str) -> Json:
    return dict(json.loads((rec.layout.shared_datastore / vm / "vm.json").read_text()))


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def host_of(agents: Agents, vm: str) -> int:
    for k in agents.rec.layout.host_numbers:
        with agents.client(k) as a:
            if a.get(f"/vms/{vm}").status_code == 200:
                return k
    raise RuntimeError(f"{vm} runs on no lab host")


def migrate(agents: Agents, vm: str, encrypted: bool) -> Json:
    """One agent-level migration from the VM's host to the other; its figures."""
    rec = agents.rec
    src = host_of(agents, vm)
    dst = 3 - src
    mid = 800_000 + secrets.randbelow(99_999)
    before = labmod.check(rec.name, vm)
    grant = mint_grant(f"host-{src}", 3600)  # as the server does: who may call the target, and how
    incoming: Json = {"migration_id": mid, "spec": spec(rec, vm), "grant": grant.model_dump(mode="json")}
    outgoing: Json = {"migration_id": mid, "vm": vm, "settings": {},
                      "target_migration_address": rec.layout.host_mig_address(dst),
                      "target_agent": {"address": rec.layout.agent_address(dst),
                                       "capability": grant.capability}}
    if encrypted:
        incoming["tls"] = {"peer": certs.host_name(rec, src)}
        outgoing["tls"] = {"peer": certs.host_name(rec, dst)}
    with agents.client(src) as s, agents.client(dst) as t:
        src_pid = int(s.get(f"/vms/{vm}").json()["pid"])
        src_cpu = cpu_s(src_pid)
        r = t.post("/migrations/incoming", json=incoming)
        r.raise_for_status()
        outgoing["uri"] = r.json()["uri"]
        dst_pid = int(t.get(f"/vms/{vm}").json()["pid"])
        dst_cpu = cpu_s(dst_pid)
        s.post("/migrations", json=outgoing).raise_for_status()

        src_last = src_cpu

        def done() -> Json | None:
            nonlocal src_last
            with contextlib.suppress(psutil.Error):  # the source QEMU quits once the target runs
                src_last = cpu_s(src_pid)
            p: Json = s.get(f"/migrations/{mid}").json()
            return p if p["status"] in ("completed", "failed", "cancelled") else None

        p = wait(f"migration {mid}", done, timeout=900, interval=0.05)
        src_used = src_last - src_cpu  # up to its last 50 ms
        dst_used = cpu_s(dst_pid) - dst_cpu
    if p["status"] != "completed":
        raise RuntimeError(f"migration {mid} {p['status']}: {p.get('error')}")
    after = labmod.wait_memtest_passes(rec.name, vm, before["memtest"]["passes"] + 2, timeout_s=300)
    m = p["metrics"]
    total_s = m["total_ms"] / 1000
    return {
        "migration_id": mid, "from": src, "to": dst, "encrypted": p["encrypted"], "total_ms": m["total_ms"],
        "downtime_ms": m["downtime_ms"], "bytes_sent": m["bytes_sent"], "rounds": m["rounds"],
        "throughput_mib_s": round(m["bytes_sent"] / total_s / MIB, 1) if total_s else None,
        "source_qemu_cpu_s": round(src_used, 2),
        "target_qemu_cpu_s": round(dst_used, 2),
        "guest_ok": after["memtest"]["mismatches"] == 0
        and after["disklog"]["durable_seq"] > before["disklog"]["durable_seq"],
        "loadavg_1m": os.getloadavg()[0],
    }


def median(runs: list[Json], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summary(doc: Json) -> str:
    lines = [f"Link: {doc['link']}; {doc['runs']} run(s) each; load average at start "
             f"{doc['machine']['loadavg_at_start'][0]:.2f} (1 min).", "",
             "| guest | stream | total s (median, runs) | MiB/s | downtime ms | source QEMU CPU s "
             "| target QEMU CPU s |", "|---|---|---|---|---|---|---|"]
    for g in doc["guests"]:
        for mode in ("plain", "encrypted"):
            runs = g[mode]
            if not runs:
                continue
            totals = ", ".join(f"{r['total_ms'] / 1000:.2f}" for r in runs)
            lines.append(
                f"| {g['title']} | {mode} | {(median(runs, 'total_ms') or 0) / 1000:.2f} ({totals}) "
                f"| {median(runs, 'throughput_mib_s')} | {median(runs, 'downtime_ms')} "
                f"| {median(runs, 'source_qemu_cpu_s')} | {median(runs, 'target_qemu_cpu_s')} |")
        plain, enc = median(g["plain"], "total_ms"), median(g["encrypted"], "total_ms")
        if plain and enc:
            lines.append(f"| {g['title']} | encrypted / plain | {enc / plain:.2f} × | | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--guests", default="demo,1g", help="comma-separated: " + ", ".join(GUESTS))
    ap.add_argument("--link", default="1gbit", help="migration link rate (tc), or 'none' for unshaped")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    chosen = [GUESTS[k] for k in args.guests.split(",")]
    link = None if args.link == "none" else args.link
    name = f"enc{os.getpid() % 100000}"
    started = time.monotonic()
    doc: Json = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([".venv/bin/python", "-m", "bench.encryption", *(argv or sys.argv[1:])]),
        "machine": {**machine(), "loadavg_at_start": os.getloadavg()},
        "link": link or "unshaped", "runs": args.runs, "guests": [], "errors": [],
    }
    say(f"lab {name}: up, migration link {link or 'unshaped'}")
    try:
        rec = labmod.up(name=name, hosts=2, migration_link_rate=link)
        rec = labmod.get(name)
        for k in rec.layout.host_numbers:
            topology.set_migration_link_rate(rec.layout, k, link)
        certs.enroll_hosts(rec)
        agents = Agents(rec)
        for g in chosen:
            entry: Json = {"guest": g.key, "title": g.title, "plain": [], "encrypted": []}
            doc["guests"].append(entry)
            say(f"{g.name}: {g.title}")
            create(rec, g)
            for i in range(args.runs):
                for encrypted in (False, True) if i % 2 == 0 else (True, False):
                    try:
                        r = migrate(agents, g.name, encrypted)
                    except (RuntimeError, TimeoutError, httpx.HTTPError) as e:
                        say(f"{g.name}: FAILED: {e}")
                        doc["errors"].append(f"{g.name}: {e}")
                        continue
                    entry["encrypted" if encrypted else "plain"].append(r)
                    say(f"{g.name} {'encrypted' if encrypted else 'plain'}: {r['total_ms'] / 1000:.2f} s, "
                        f"{r['throughput_mib_s']} MiB/s, CPU src {r['source_qemu_cpu_s']} s")
                    write(args.out, doc, started)
            with agents.client(host_of(agents, g.name)) as a:  # free the CPU for the next guest
                a.post(f"/vms/{g.name}/power", json={"action": "stop"})
    finally:
        say(f"lab {name}: down")
        doc["lab_teardown_problems"] = labmod.down(name)
        write(args.out, doc, started)
    print(summary(doc))
    return 0 if not doc["errors"] else 1


def write(out: Path, doc: Json, started: float) -> None:
    doc["duration_s"] = round(time.monotonic() - started)
    out.mkdir(parents=True, exist_ok=True)
    (out / "encryption-latest.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (out / "encryption-latest.md").write_text(summary(doc))


if __name__ == "__main__":
    raise SystemExit(main())
