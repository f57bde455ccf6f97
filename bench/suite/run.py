"""`make bench`: vmshift beside its peers, every scenario in one lab, one run.

    .venv/bin/python -m bench.suite.run [--quick] [--scenario NAME ...] [--no-libvirt]
        [--out bench/results]      # writes latest.json, latest.md and latest-*.png there

Per scenario (scenarios.py), on the same lab and the same migration link:
1. vmshift: the guest is created on host-1 through the server and migrated to host-2 through the
   server's API, as a user would.
2. The peers driven over QMP (policies.py): the server and agents are stopped (the QEMU keeps
   running), and the benchmark migrates the same guest back and forth with each peer's policy
   (qmp_leg.py). Then the guest is stopped and removed through the server.
3. libvirt itself (libvirt_peer.py): a guest with the same memory, vCPUs and workload, booted under a
   libvirt daemon in host-1's namespace and moved by `virsh migrate --live` with its defaults.
4. The physical limit: the data pages that had to cross (the first pass's non-zero bytes) over the
   link's rate.
Every leg is watched the same way (observe.py) and the guest is verified after it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmshift.client import VmshiftClient
from vmshift.errors import VmshiftError
from vmshift.lab import lab, processes, topology
from vmshift.lab.layout import LabRecord
from vmshift.model.enums import PowerAction, TaskState
from vmshift.model.migration import MigrationStatus

from . import policies, qmp_leg, report
from .observe import Observers, say, summary
from .scenarios import Scenario, select

Json = dict[str, Any]
REPO = Path(__file__).resolve().parents[2]
VM = "bench-vm"
MEMTEST_PASS_TIMEOUT_S = 120.0


# ---------------------------------------------------------------- the guest


def guest_check(rec: LabRecord, ip: str, wait_s: float = 30.0) -> Json:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            answer = lab.run_probe(rec, ["check", ip])
        except VmshiftError as e:
            answer = {"echo": False, "error": str(e)}
        if (answer.get("echo") and "error" not in answer) or time.monotonic() >= deadline:
            return answer
        time.sleep(0.5)


def verify(rec: LabRecord, ip: str, before: Json, s: Scenario) -> Json:
    """After a leg: one more full memtest pass with 0 mismatches, echo, more durable disklog records."""
    want = ((before.get("memtest") or {}).get("passes") or 0) + 1
    deadline = time.monotonic() + MEMTEST_PASS_TIMEOUT_S
    while True:
        after = guest_check(rec, ip)
        mt = after.get("memtest") or {}
        if not s.memtest or (after.get("echo") and mt.get("passes", 0) >= want):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    b_dl, a_dl = before.get("disklog") or {}, after.get("disklog") or {}
    ok = (
        bool(after.get("echo"))
        and (
            not s.memtest
            or (
                (after.get("memtest") or {}).get("mismatches") == 0
                and (after.get("memtest") or {}).get("passes", 0) >= want
            )
        )
        and (a_dl.get("durable_seq") or 0) > (b_dl.get("durable_seq") or 0)
    )
    return {
        "verified": ok,
        "memtest": after.get("memtest"),
        "disklog": a_dl,
        "echo": after.get("echo"),
        "error": after.get("error"),
    }


def create_guest(api: VmshiftClient, rec: LabRecord, s: Scenario) -> str:
    task = api.create_vm(
        {
            "name": VM,
            "host": "host-1",
            "cpus": s.cpus,
            "memory_mib": s.memory_mib,
            "datastore": "shared-1",
            "networks": ["VM Network"],
            "disks_mib": [64],
            "image": "lab-guest",
            "start": True,
            "kernel_args": s.kernel_args,
        }
    )
    final = api.wait_task(task["id"], timeout=300)
    if final["state"] != TaskState.SUCCESS:
        raise VmshiftError(f"Creating {VM} failed: {final.get('error')}")
    ip = str(api.get_vm(VM)["ip"])
    wait_ready(rec, ip, s)
    return ip


def wait_ready(rec: LabRecord, ip: str, s: Scenario) -> Json:
    """The guest answers and (with memtest) has finished a pass: its working set is dirty."""
    deadline = time.monotonic() + MEMTEST_PASS_TIMEOUT_S
    while True:
        answer = guest_check(rec, ip, wait_s=60)
        if answer.get("echo") and (not s.memtest or (answer.get("memtest") or {}).get("passes", 0) >= 1):
            return answer
        if time.monotonic() > deadline:
            raise VmshiftError(f"The guest at {ip} is not ready: {answer}")
        time.sleep(0.5)


def remove_guest(api: VmshiftClient) -> None:
    with contextlib.suppress(VmshiftError):
        api.wait_task(api.power_vm(VM, PowerAction.STOP)["id"], timeout=120)
    api.wait_task(api.delete_vm(VM)["id"], timeout=120)


# ---------------------------------------------------------------- the sides


def vmshift_leg(rec: LabRecord, api: VmshiftClient, s: Scenario, ip: str) -> Json:
    before = guest_check(rec, ip)
    obs = Observers(rec.layout.client_ns, ip, http=s.httpd)
    obs.start()
    obs.mark_start()
    m: Json = {}
    try:
        started = api.migrate_vm(VM, "host-2")
        api.wait_task(started["id"], timeout=900)
        m = api.get_migration(int(started["migration_id"]))
    finally:
        obs.mark_end()
        watched = obs.stop()
    done = m.get("status") == MigrationStatus.COMPLETED
    metrics = m.get("metrics") or {}
    return {
        "converged": done,
        "status": m.get("status"),
        "error": m.get("error"),
        "total_ms": m.get("total_ms") if done else None,
        "downtime_ms": m.get("downtime_ms") if done else None,
        "bytes_sent": m.get("bytes_sent"),
        "rounds": m.get("rounds"),
        "max_throttle_percent": metrics.get("max_throttle_percent"),
        "peak_throughput_bps": metrics.get("peak_throughput_bps"),
        "predicted_total_ms": m.get("predicted_total_ms"),
        "predicted_downtime_ms": m.get("predicted_downtime_ms"),
        "prediction": m.get("prediction"),
        "timeline": metrics.get("timeline"),
        "postcopy": metrics.get("postcopy"),
        "migration_id": m.get("id"),
        "actions": [
            {k: a.get(k) for k in ("kind", "value", "time_s", "reason")} for a in m.get("actions", [])
        ],
        **summary(watched),
        "probes": watched,
        "guest": verify(rec, ip, before, s),
    }


def peer_legs(rec: LabRecord, s: Scenario, ip: str, work: Path) -> dict[str, Json]:
    """The emulated peers, one leg each, on the guest vmshift just moved to host-2."""
    lay = rec.layout
    out: dict[str, Json] = {}
    processes.stop_server(rec.name)
    for k in lay.host_numbers:
        processes.stop_agent(rec.name, k)
    vm = qmp_leg.agent_vm(lay, 2, VM)
    try:
        for n, policy in enumerate(policies.emulated_peers()):
            say(f"  {policy.name}: host-{vm.host} -> host-{2 if vm.host == 1 else 1}")
            before = guest_check(rec, ip)
            obs = Observers(lay.client_ns, ip, http=s.httpd)
            obs.start()
            try:
                vm, res = asyncio.run(
                    qmp_leg.drive(
                        lay,
                        vm,
                        policy,
                        s.memory_mib,
                        work / policy.name,
                        f"{n}{s.name[:8]}",
                        s.limit_s,
                        on_start=obs.mark_start,
                    )
                )
            finally:
                obs.mark_end()
                watched = obs.stop()
            res.update(summary(watched))
            res["probes"] = watched
            res["label"], res["source"] = policy.label, policy.source
            res["guest"] = verify(rec, ip, before, s)
            out[policy.name] = res
            say_result(policy.name, res)
    finally:
        qmp_leg.kill_qemu(vm.pid)
        qmp_leg.remove_tap(lay, vm)
        for k in lay.host_numbers:
            processes.start_agent(rec.name, k)
        processes.start_server(rec.name)
    return out


def libvirt_leg(lv: Any, rec: LabRecord, s: Scenario, index: int) -> Json:
    from .libvirt_peer import LibvirtGuest

    ip, mac = lv.pick_guest(rec.name, index)
    name = f"lvbench{index}"
    g = LibvirtGuest(
        name=name, memory_mib=s.memory_mib, cpus=s.cpus, kernel_args=s.kernel_args, ip=ip, mac=mac
    )
    lv.start_guest(1, g)
    try:
        before = wait_ready(rec, ip, s)
        obs = Observers(rec.layout.client_ns, ip, http=s.httpd)
        obs.start()
        obs.mark_start()
        try:
            res: Json = lv.migrate(name, 1, 2, timeout_s=s.limit_s)
        finally:
            obs.mark_end()
            watched = obs.stop()
        res.update(summary(watched))
        res["probes"] = watched
        res["label"] = "libvirt 11 (virsh migrate --live, defaults)"
        res["guest"] = verify(rec, ip, before, s)
        return res
    finally:
        lv.destroy_guest(name)


def say_result(side: str, r: Json, extra: str = "") -> None:
    """One progress line per leg, the same for every side."""
    outcome = "converged" if r.get("converged") else r.get("abort") or r.get("error") or r.get("status")
    say(
        f"  {side}: {outcome}, total {r.get('total_ms')} ms, downtime {r.get('downtime_ms')} ms, "
        f"gap {r.get('max_gap_ms')} ms{extra}"
    )


def physical_limit(s: Scenario, results: dict[str, Json]) -> Json:
    """Each data page has to cross once: the first pass's non-zero bytes over the link's rate."""
    firsts = [r["first_pass_normal_bytes"] for r in results.values() if r.get("first_pass_normal_bytes")]
    rate = s.link_bytes_per_s
    how = f"tc rate {s.link}"
    if rate is None:
        peaks = [
            r.get("peak_throughput_bps") or (r.get("metrics") or {}).get("peak_throughput_bps") or 0
            for r in results.values()
        ]
        rate = max(peaks, default=0) or None  # QEMU's throughput, already in bytes per second
        how = "the highest throughput any side reached on the unshaped link"
    if not firsts or not rate:
        return {"limit_ms": None, "why": "no first-pass byte count or no link rate was measured"}
    need = min(firsts)
    return {
        "limit_ms": round(need / rate * 1000),
        "bytes": need,
        "link_bytes_per_s": round(rate),
        "rate_from": how,
    }


def run_scenario(
    rec: LabRecord, api: VmshiftClient, s: Scenario, work: Path, lv: Any, index: int, peers: bool = True
) -> Json:
    lay = rec.layout
    for k in lay.host_numbers:
        topology.set_migration_link_rate(lay, k, s.link)
    say(f"{s.name}: {s.title}")
    out: Json = {
        "name": s.name,
        "title": s.title,
        "link": s.link or "unshaped",
        "scenario": s.record(),
        "results": {},
        "errors": [],
        # other work on the machine skews every figure: the load when the scenario started says how much
        "loadavg_1m_at_start": os.getloadavg()[0],
    }
    ip = create_guest(api, rec, s)
    try:
        say("  vmshift: host-1 -> host-2 through the server")
        out["results"]["vmshift"] = r = vmshift_leg(rec, api, s, ip)
        say_result("vmshift", r, f" (predicted {r['predicted_total_ms']} / {r['predicted_downtime_ms']} ms)")
        if r["converged"] and peers:
            out["results"].update(peer_legs(rec, s, ip, work / s.name))
    finally:
        try:
            remove_guest(api)
        except VmshiftError as e:
            out["errors"].append(f"removing the guest: {e}")
    if lv is not None:
        try:
            say("  libvirt: host-1 -> host-2 (virsh migrate --live)")
            out["results"]["libvirt"] = r = libvirt_leg(lv, rec, s, index)
            say_result("libvirt", r)
        except Exception as e:
            out["errors"].append(f"libvirt: {e}")
            say(f"  libvirt failed: {e}")
    limit = physical_limit(s, out["results"])
    out["limit_ms"] = limit["limit_ms"]
    out["physical_limit"] = limit
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="three scenarios (make bench-quick)")
    ap.add_argument("--scenario", action="append", help="run only this scenario (repeatable)")
    ap.add_argument("--no-libvirt", action="store_true", help="leave real libvirt out")
    ap.add_argument("--vmshift-only", action="store_true", help="no peers at all (a quick look at vmshift)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    chosen = select(args.scenario, args.quick)
    name = f"bench{os.getpid() % 100000}"
    work = Path(f"/var/tmp/vmshift-bench-{name}")
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    doc: Json = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.suite.run", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "libvirt": None,
        "scenarios": [],
    }
    say(f"lab {name}: up; {len(chosen)} scenario(s): {', '.join(s.name for s in chosen)}")
    try:
        rec = lab.up(name=name, hosts=2)
        rec = lab.get(name)
        with (
            contextlib.ExitStack() as stack,
            VmshiftClient(rec.server_url or "", rec.token or "", ca_file=rec.ca_file, timeout=60) as api,
        ):
            lv = None
            if not (args.no_libvirt or args.vmshift_only):
                lv, doc["libvirt"] = open_libvirt(stack, name, work)
            for i, s in enumerate(chosen):
                try:
                    doc["scenarios"].append(run_scenario(rec, api, s, work, lv, i, not args.vmshift_only))
                except Exception as e:
                    say(f"{s.name}: FAILED: {e}")
                    doc["scenarios"].append(
                        {
                            "name": s.name,
                            "title": s.title,
                            "link": s.link or "unshaped",
                            "limit_ms": None,
                            "results": {},
                            "errors": [traceback.format_exc()],
                        }
                    )
                write(args.out, doc, started)
    finally:
        say(f"lab {name}: down")
        doc["lab_teardown_problems"] = lab.down(name)
    write(args.out, doc, started, plots=True)
    return 0 if all(not sc.get("errors") for sc in doc["scenarios"]) else 1


def open_libvirt(stack: contextlib.ExitStack, name: str, work: Path) -> tuple[Any, Json]:
    try:
        from .libvirt_peer import LibvirtLab

        lv = stack.enter_context(LibvirtLab(name, work / "libvirt"))
    except Exception as e:
        return None, {"available": False, "why": f"{type(e).__name__}: {e}"}
    if lv.unavailable:
        return None, {"available": False, "why": lv.unavailable}
    return lv, {"available": True}


def machine() -> Json:
    import subprocess

    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False)
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "accelerator": "tcg",
        "qemu": qemu.stdout.splitlines()[0] if qemu.stdout else None,
        "commit": head,
    }


def write(out: Path, doc: Json, started: float, plots: bool = False) -> None:
    doc["duration_s"] = round(time.monotonic() - started)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (out / "latest.md").write_text(report.markdown(doc, plots=plots))
    if plots:
        report.plots(doc, out)
    say(f"wrote {out / 'latest.json'} and latest.md")


if __name__ == "__main__":
    raise SystemExit(main())
