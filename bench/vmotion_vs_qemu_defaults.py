"""Benchmark: vmshift's live migration against QEMU's default migration, same VM, same lab.

    sudo .venv/bin/python bench/vmotion_vs_qemu_defaults.py [--link 1gbit] [--memory 1024]
        [--memtest 512,0] [--baseline-timeout 40] [--light] [--json OUT]

One lab (two hosts, migration link shaped to --link) is brought up and always torn down. In it a
guest runs memtest on host-1, then:

1. BASELINE, QEMU's defaults: the target agent prepares an incoming QEMU exactly as for vmshift;
   then we drive the *source* QEMU over QMP ourselves, with QEMU's default parameters (no
   max-bandwidth, downtime-limit or throttle change, no auto-converge), sampling query-migrate
   every 500 ms for --baseline-timeout seconds.
   QEMU's QMP socket takes one client at a time and the source agent holds it, so the source
   agent (and the server, so that its heartbeat does not react) are stopped for the baseline and
   started again after it; the agent re-attaches to the running QEMU (SIGTERM keeps VMs).
   The capability ``pause-before-switchover`` is switched on for the baseline only: it does not
   change how pre-copy converges, but it lets us see that QEMU *would* switch over (status
   ``pre-switchover``) and then cancel, so the guest never runs on the target outside vmshift's
   inventory. A converged baseline therefore reports its time to switchover and QEMU's expected
   downtime, not a measured downtime.
2. VMSHIFT: the same VM migrates host-1 -> host-2 through the server API while a 1 ms UDP probe runs
   from the client namespace; then memtest must finish two more passes with 0 mismatches.

--light adds FACTS.md's lighter scenario (512 MiB guest, 64 MiB rewritten at 50 MiB/s, unshaped
link) in the same lab, after the first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from vmshift.client import VmshiftClient
from vmshift.errors import VmshiftError
from vmshift.lab import lab, processes, topology
from vmshift.lab.layout import LabLayout, LabRecord
from vmshift.lab.probe import udp_probe_process
from vmshift.migration.samples import MigrationSample, QemuMigrationStatus, summarize
from vmshift.model.enums import PowerAction, TaskState
from vmshift.model.migration import MigrationStatus
from vmshift.qemu import migration_qmp as mq
from vmshift.qemu.qmp import QmpSession

Q = QemuMigrationStatus
Json = dict[str, Any]
BASELINE_ID_BASE = 900000  # far above the ids vmshift's server hands out
SAMPLE_EVERY_S = 0.5
POLL_EVERY_S = 0.05  # how fast we notice pre-switchover (the guest is paused while it waits)
QUERIED_PARAMETERS = ("max-bandwidth", "downtime-limit", "cpu-throttle-initial",
                      "cpu-throttle-increment", "max-cpu-throttle", "multifd-channels")
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Scenario:
    name: str
    vm: str
    memory_mib: int
    memtest: str  # "SIZE_MIB,RATE_MIBPS" (0 = flat out)
    link: str | None  # tc rate of the migration link, None = unshaped
    baseline_timeout_s: float


# ---------------------------------------------------------------- guest


def create_guest(api: VmshiftClient, s: Scenario) -> Json:
    task = api.create_vm({
        "name": s.vm, "host": "host-1", "cpus": 1, "memory_mib": s.memory_mib, "datastore": "shared-1",
        "networks": ["VM Network"], "disks_mib": [64], "image": "lab-guest", "start": True,
        "kernel_args": f"vmshift.memtest={s.memtest} vmshift.disklog=1",
    })
    final = api.wait_task(task["id"], timeout=300)
    if final["state"] != TaskState.SUCCESS:
        raise VmshiftError(f"Creating VM {s.vm} failed: {final.get('error')}")
    return api.get_vm(s.vm)


def remove_guest(api: VmshiftClient, vm: str) -> None:
    with contextlib.suppress(VmshiftError):
        api.wait_task(api.power_vm(vm, PowerAction.STOP)["id"], timeout=120)
    with contextlib.suppress(VmshiftError):
        api.wait_task(api.delete_vm(vm)["id"], timeout=120)


# ---------------------------------------------------------------- baseline: QEMU's defaults


def agent_http(lay: LabLayout, k: int) -> httpx.Client:
    return processes.agent_http(lay, k)


async def drive_default_migration(sock: Path, uri: str, timeout_s: float) -> Json:
    """migrate with QEMU's defaults; sample; stop at pre-switchover or timeout; leave the source running."""
    qmp = await QmpSession.connect(sock, timeout_s=10, name="bench")
    out: Json = {}
    try:
        params = await mq.query_parameters(qmp)
        out["parameters"] = {k: params.get(k) for k in QUERIED_PARAMETERS}
        caps = await mq.query_capabilities(qmp)
        out["capabilities_on_before"] = sorted(k for k, v in caps.items() if v)
        await mq.set_capabilities(qmp, {"pause-before-switchover": True})
        samples: list[MigrationSample] = []
        start = time.monotonic()
        await mq.migrate(qmp, uri)
        next_sample, status = start, Q.SETUP
        while True:
            answer = await mq.query_migrate(qmp)
            now = time.monotonic()
            sample = MigrationSample.from_qmp(answer, now - start)
            status = sample.status
            if now >= next_sample or status not in (Q.ACTIVE, Q.SETUP):
                samples.append(sample)
                next_sample += SAMPLE_EVERY_S
            if status not in (Q.ACTIVE, Q.SETUP) or now - start >= timeout_s:
                break
            await asyncio.sleep(POLL_EVERY_S)
        elapsed = time.monotonic() - start
        last = samples[-1]
        out["outcome"] = ("converged" if status is Q.PRE_SWITCHOVER else
                          "not_converged" if status is Q.ACTIVE else f"qemu_{status.value}")
        out["elapsed_s"] = round(elapsed, 2)
        out["qemu_status_at_end"] = status.value
        out["expected_downtime_ms"] = last.expected_downtime_ms
        out["remaining_bytes_at_end"] = last.remaining_bytes
        out["error"] = last.error
        out["metrics"] = summarize(samples).model_dump()
        out["samples"] = [s.to_record().model_dump() for s in samples]
        # Roll back: cancel, wait until QEMU settles, source running, capability off again.
        if status not in (Q.COMPLETED, Q.FAILED, Q.CANCELLED):
            await mq.migrate_cancel(qmp)
        deadline = time.monotonic() + 30
        while (final := Q.parse(str((await mq.query_migrate(qmp)).get("status", "none")))) not in (
                Q.CANCELLED, Q.FAILED, Q.COMPLETED):
            if time.monotonic() > deadline:
                raise VmshiftError(f"The source QEMU did not settle after migrate_cancel ({final.value}).")
            await asyncio.sleep(0.1)
        out["qemu_status_after_cancel"] = final.value
        if final is Q.COMPLETED:
            raise VmshiftError("QEMU completed the baseline migration despite pause-before-switchover; "
                               "the guest now runs outside vmshift's inventory.")
        running = (await qmp.query_status()).running
        out["source_needed_cont"] = not running
        if not running:
            await qmp.cont()
        out["source_running_after"] = (await qmp.query_status()).running
    finally:
        with contextlib.suppress(VmshiftError):
            if Q.parse(str((await mq.query_migrate(qmp)).get("status", "none"))) in (
                    Q.CANCELLED, Q.FAILED, Q.NONE):
                await mq.set_capabilities(qmp, {"pause-before-switchover": False})
        await qmp.close()
    return out


def run_baseline(rec: LabRecord, api: VmshiftClient, s: Scenario, migration_id: int, ip: str) -> Json:
    lay = rec.layout
    spec = json.loads((lay.shared_datastore / s.vm / "vm.json").read_text())
    sock = lay.agent_state_dir(1) / "vms" / s.vm / "qmp.sock"
    result: Json = {"migration_id": migration_id, "timeout_s": s.baseline_timeout_s}
    with agent_http(lay, 2) as target:
        r = target.post("/migrations/incoming", json={"migration_id": migration_id, "spec": spec})
        if r.status_code >= 300:
            raise VmshiftError(f"The target agent refused the baseline's incoming migration: {r.text}")
        uri = r.json()["uri"]
        result["uri"] = uri
        say(f"baseline: target listens on {uri}; stopping the server and host-1's agent "
            "(QEMU's QMP socket takes one client)")
        processes.stop_server(rec.name)
        processes.stop_agent(rec.name, 1)
        udp = udp_probe_process(lay.client_ns, ip)
        try:
            say(f"baseline: migrate with QEMU's defaults, up to {s.baseline_timeout_s:g} s")
            result.update(asyncio.run(drive_default_migration(sock, uri, s.baseline_timeout_s)))
        finally:
            result["udp"] = udp.stop()
            r = target.delete(f"/migrations/{migration_id}")
            result["target_rolled_back"] = r.status_code < 300
            say("baseline: target rolled back; starting host-1's agent and the server again")
            processes.start_agent(rec.name, 1)
            processes.start_server(rec.name)
    wait_connected(api, "host-1")
    result["guest_after"] = lab.check(rec.name, s.vm, wait_s=30)
    return result


def wait_connected(api: VmshiftClient, host: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while api.get_host(host).get("connection_state") != "connected":
        if time.monotonic() > deadline:
            raise VmshiftError(f"{host} did not reconnect to the server within {timeout_s:g} s.")
        time.sleep(0.5)


# ---------------------------------------------------------------- vmshift


def run_vmshift(rec: LabRecord, api: VmshiftClient, s: Scenario, ip: str) -> Json:
    before = lab.check(rec.name, s.vm, wait_s=30)
    udp = udp_probe_process(rec.layout.client_ns, ip)
    try:
        started = api.migrate_vm(s.vm, "host-2")
        mid = int(started["migration_id"])
        say(f"vmshift: migration {mid} host-1 -> host-2")
        api.wait_task(started["id"], timeout=1800)
        m = api.get_migration(mid)
        if m["status"] == MigrationStatus.COMPLETED:
            lab.check(rec.name, s.vm, wait_s=30)  # the guest answers from host-2 before the probe stops
    finally:
        udp_report = udp.stop()
    say(f"vmshift: migration {mid} {m['status']} in {m.get('total_ms')} ms; verifying the guest")
    result: Json = {
        "migration_id": mid, "status": m["status"], "error": m.get("error"),
        "total_ms": m.get("total_ms"), "downtime_ms": m.get("downtime_ms"), "rounds": m.get("rounds"),
        "bytes_sent": m.get("bytes_sent"), "metrics": m.get("metrics"),
        "predicted_total_ms": m.get("predicted_total_ms"),
        "predicted_downtime_ms": m.get("predicted_downtime_ms"), "prediction": m.get("prediction"),
        "actions": [{k: a.get(k) for k in ("kind", "value", "time_s", "reason")}
                    for a in m.get("actions", [])],
        "udp": udp_report,
    }
    if m["status"] == MigrationStatus.COMPLETED:
        result["host_after"] = api.get_vm(s.vm)["host"]
        after = lab.wait_memtest_passes(rec.name, s.vm, before["memtest"]["passes"] + 2, timeout_s=240)
        result["guest_after"] = after
        result["verified"] = (after["memtest"]["mismatches"] == 0 and after["echo"] is True
                              and after["disklog"]["durable_seq"] > before["disklog"]["durable_seq"])
    return result


# ---------------------------------------------------------------- comparison and output


def compare(base: Json, vms: Json) -> Json:
    bm = base.get("metrics") or {}
    if base.get("outcome") != "converged":
        return {
            "baseline": (f"did not converge in {base['timeout_s']:g} s ({bm.get('rounds')} rounds, "
                         f"{bm.get('bytes_sent', 0) / 1e9:.2f} GB sent, "
                         f"{base.get('remaining_bytes_at_end', 0) / 2**20:.0f} MiB still to send)"),
            "total_time_ratio": None, "bytes_ratio": None,
        }
    total_s = (vms.get("total_ms") or 0) / 1000
    return {
        "baseline": (f"converged: ready to switch over after {base['elapsed_s']:g} s "
                     f"(QEMU expected {base.get('expected_downtime_ms')} ms downtime)"),
        # baseline time excludes its switchover; vmshift's total includes it
        "total_time_ratio": round(base["elapsed_s"] / total_s, 2) if total_s else None,
        "bytes_ratio": round(bm["bytes_sent"] / vms["bytes_sent"], 2) if vms.get("bytes_sent") else None,
    }


def _mismatches(side: Json) -> str:
    return str(((side.get("guest_after") or {}).get("memtest") or {}).get("mismatches"))


def table(results: list[Json]) -> str:
    head = ("scenario", "side", "outcome", "time s", "downtime ms", "rounds", "GB sent", "max throttle %",
            "UDP gap ms", "memtest mismatches")
    rows: list[tuple[str, ...]] = [head]
    notes: list[str] = []
    for r in results:
        b, v = r["baseline"], r["vmshift"]
        bm, vm_ = b.get("metrics") or {}, v.get("metrics") or {}
        converged = b.get("outcome") == "converged"
        rows.append((
            r["scenario"]["name"], "QEMU defaults", str(b.get("outcome")), f"{b.get('elapsed_s', 0):.1f}",
            f"(expected {b.get('expected_downtime_ms')})" if converged else "-", str(bm.get("rounds")),
            f"{bm.get('bytes_sent', 0) / 1e9:.2f}", str(bm.get("max_throttle_percent")),
            f"{b['udp'].get('max_gap_ms', 0):.1f}", _mismatches(b)))
        rows.append((
            "", "vmshift", str(v["status"]), f"{(v.get('total_ms') or 0) / 1000:.1f}",
            str(v.get("downtime_ms")), str(v.get("rounds")), f"{(v.get('bytes_sent') or 0) / 1e9:.2f}",
            str(vm_.get("max_throttle_percent")), f"{v['udp'].get('max_gap_ms', 0):.1f}", _mismatches(v)))
        c = r["comparison"]
        notes.append(f"{r['scenario']['name']}: baseline {c['baseline']}; time ratio (baseline/vmshift) "
                     f"{c['total_time_ratio']}, bytes ratio {c['bytes_ratio']}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join([*lines, "", *notes])


def run_scenario(rec: LabRecord, api: VmshiftClient, s: Scenario, migration_id: int) -> Json:
    lay = rec.layout
    for k in lay.host_numbers:
        topology.set_migration_link_rate(lay, k, s.link)
    say(f"{s.name}: creating {s.vm} ({s.memory_mib} MiB, memtest {s.memtest}), link {s.link or 'unshaped'}")
    vm = create_guest(api, s)
    lab.wait_memtest_passes(rec.name, s.vm, 1, timeout_s=300)
    say(f"{s.name}: memtest finished a full pass")
    base = run_baseline(rec, api, s, migration_id, vm["ip"])
    say(f"baseline: {base.get('outcome')} after {base.get('elapsed_s')} s")
    vms = run_vmshift(rec, api, s, vm["ip"])
    result = {"scenario": asdict(s), "baseline": base, "vmshift": vms, "comparison": compare(base, vms)}
    remove_guest(api, s.vm)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--link", default="1gbit", help="migration link rate (tc), or 'none' for unshaped")
    ap.add_argument("--memory", type=int, default=1024, help="guest memory in MiB")
    ap.add_argument("--memtest", default="512,0", help="memtest SIZE_MIB,RATE_MIBPS (0 = flat out)")
    ap.add_argument("--baseline-timeout", type=float, default=40.0)
    ap.add_argument("--light", action="store_true", help="also run 512 MiB / 64,50 on an unshaped link")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    link = None if args.link.lower() in ("none", "") else args.link
    title = f"{args.memory} MiB, memtest {args.memtest}, link {link or 'unshaped'}"
    scenarios = [Scenario(title, "bench-hot", args.memory, args.memtest, link, args.baseline_timeout)]
    if args.light:
        scenarios.append(Scenario("512 MiB, memtest 64,50, link unshaped", "bench-light", 512, "64,50", None,
                                  args.baseline_timeout))
    name = f"bench{os.getpid() % 100000}"
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    results: list[Json] = []
    problems: list[str] = []
    say(f"lab {name}: up (2 hosts, migration link {link or 'unshaped'})")
    try:
        rec = lab.up(name=name, hosts=2, migration_link_rate=link)
        rec = lab.get(name)
        with VmshiftClient(rec.server_url or "", rec.token or "", ca_file=rec.ca_file, timeout=60) as api:
            for i, s in enumerate(scenarios, start=1):
                results.append(run_scenario(lab.get(name), api, s, BASELINE_ID_BASE + i))
    finally:
        say(f"lab {name}: down")
        problems = lab.down(name)
    report = {"started_at": started_at, "command": " ".join(sys.argv),
              "machine": "2 cores, TCG, QEMU 10.0.2", "lab_teardown_problems": problems, "results": results}
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
