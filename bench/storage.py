"""`make bench-storage`: issue 8's four storage figures, each beside its baseline, in one lab, one run.

    .venv/bin/python -m bench.storage [--quick] [--only mirror|pivot|sparse|suspend ...]
        [--out bench/results]     # writes storage-latest.json and storage-latest.md there

1. **mirror**: a running VM's disks (64 MiB + 1 GiB, the second written full from the host side)
   moved by Storage vMotion shared-1 -> local-host-1 and back, against ``qemu-img convert -n -W -m 16``
   of the same images between the same two folders (reading the running VM's images with ``-U``),
   alternating, both directions; the ratio of median throughputs.
2. **pivot**: a running VM with the disk log moved shared-1 <-> local-host-1 again and again; after
   each move the guest's disk-log latency window (the last 10 s, read at once) and its worst write
   since boot give the worst write of that move; p99 and max over the moves.
3. **sparse**: cold moves of two powered-off VMs, one with a 4 GiB disk holding 256 MiB, one with a
   256 MiB disk written full, same host and to the other host (NBD), alternating; median times.
4. **suspend**: a 1 GiB guest whose memtest has written 768 MiB, suspended: QEMU's write rate against
   ``dd oflag=direct`` of as many MiB into the same datastore, and the state file's size against RAM;
   resumed, memtest must go on with 0 mismatches.
The guest is verified after every move (bench.suite.run.verify), and each failure is counted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import storage_report
from bench.storage_lab import (
    MIB,
    Failures,
    Fill,
    Guest,
    boot,
    create,
    dd_direct,
    disk_paths,
    fill,
    move,
    power,
    remove,
    run,
    verify_booted,
    verify_running,
    virtual_size,
)
from bench.suite.observe import say
from bench.suite.run import guest_check, machine
from bench.suite.scenarios import Scenario

from vmshift.client import VmshiftClient
from vmshift.errors import VmshiftError
from vmshift.lab import lab, topology
from vmshift.lab.layout import LabRecord
from vmshift.model.enums import PowerAction, PowerState, TaskState

Json = dict[str, Any]
REPO = Path(__file__).resolve().parents[1]
SHARED, LOCAL1, LOCAL2 = "shared-1", "local-host-1", "local-host-2"
SUSPEND_MEMTEST_MIB = 768
PIVOT_RATE = 200  # disk-log records per second in the pivot section's guest
CONVERT = ["qemu-img", "convert", "-U", "-n", "-W", "-m", "16", "-f", "qcow2", "-O", "qcow2"]


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------- 1. mirror vs qemu-img convert


def convert_copy(sources: list[Path], folder: Path) -> Json:
    """``qemu-img convert -n -W -m 16`` of each image into a pre-created qcow2 of its size in folder.

    ``ms`` is the command as the issue names it; its default cache mode (``unsafe``) never flushes,
    so the copy may still sit in the page cache when it returns. The mirror flushes its target
    before it reports READY, so ``ms_fsync`` adds an fsync of each copy: the same durability.
    """
    folder.mkdir(parents=True, exist_ok=True)
    try:
        targets = []
        for i, src in enumerate(sources):
            t = folder / f"convert-{i}.qcow2"
            run(["qemu-img", "create", "-q", "-f", "qcow2", str(t), str(virtual_size(src))])
            targets.append(t)
        os.sync()  # no other copy's dirty pages left to write back on this one's time
        t0 = time.monotonic()
        for src, t in zip(sources, targets, strict=True):
            run([*CONVERT, str(src), str(t)])
        t1 = time.monotonic()
        for t in targets:
            fd = os.open(t, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        t2 = time.monotonic()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"ms": round((t1 - t0) * 1000, 1), "ms_fsync": round((t2 - t0) * 1000, 1)}


def bench_mirror(rec: LabRecord, api: VmshiftClient, reps: int, fails: Failures) -> Json:
    g = Guest(
        "stor-mirror", Scenario("mirror", "mirror", 256, 1, "32,20", None), (64, 1024), (Fill(1, 0, 1024),)
    )
    create(api, g)
    fill(disk_paths(rec, api, g.vm)[1], g.fills[0])
    ip, _ = boot(rec, api, g)
    ds = rec.layout.datastores_dir
    total_bytes = sum(virtual_size(p) for p in disk_paths(rec, api, g.vm))
    samples: list[Json] = []
    try:
        for rep in range(reps):
            for leg, (src, dst) in enumerate(((SHARED, LOCAL1), (LOCAL1, SHARED))):
                order = ("convert", "mirror") if (rep + leg) % 2 == 0 else ("mirror", "convert")
                for method in order:
                    if method == "convert":
                        sources = disk_paths(rec, api, g.vm)
                        r = convert_copy(sources, ds / dst / f"bench-convert-{g.vm}")
                        r.update(
                            method="convert",
                            path=f"{src} -> {dst}",
                            bytes=total_bytes,
                            throughput_bps=total_bytes / (r["ms"] / 1000),
                            throughput_fsync_bps=total_bytes / (r["ms_fsync"] / 1000),
                        )
                        say(f"  convert {src} -> {dst}: {r['ms']:.0f} ms, with fsync {r['ms_fsync']:.0f} ms")
                    else:
                        before = guest_check(rec, ip)
                        os.sync()
                        m = move(api, g.vm, dst, rec=rec)
                        fails.check(m["ok"], f"mirror {src} -> {dst}: the move {m['status']} ({m['error']})")
                        v = verify_running(rec, ip, before, g, fails, f"mirror {src} -> {dst}")
                        split = mirror_split(m)
                        r = {
                            **split,
                            "method": "mirror",
                            "path": f"{src} -> {dst}",
                            "bytes": total_bytes,
                            "ms": m["total_ms"],
                            "move": m,
                            "guest_ok": v["verified"],
                            "throughput_bps": total_bytes / (m["total_ms"] / 1000) if m["total_ms"] else None,
                        }
                        say(
                            f"  mirror {src} -> {dst}: {m['total_ms']} ms (pivot {m['pivot_ms']} ms), "
                            f"guest ok {v['verified']}"
                        )
                    samples.append(r)
    finally:
        remove(api, g.vm)

    def med(method: str, key: str = "throughput_bps") -> float | None:
        return median([s[key] for s in samples if s["method"] == method and s.get(key)])

    return {
        "vm": g.vm,
        "disks_mib": list(g.disks_mib),
        "data_mib": 1024,
        "bytes": total_bytes,
        "convert_command": " ".join([*CONVERT, "SRC", "DST"]),
        "samples": samples,
        "mirror_bps": med("mirror"),
        "convert_bps": med("convert"),
        "convert_fsync_bps": med("convert", "throughput_fsync_bps"),
        "mirror_write_blocking_moves": sum(1 for s in samples if s.get("write_blocking")),
        "mirror_prepare_s": median([s["prepare_s"] for s in samples if s.get("prepare_s") is not None]),
        "mirror_copy_s": median([s["copy_s"] for s in samples if s.get("copy_s") is not None]),
        "mirror_after_ready_s": median(
            [s["after_ready_s"] for s in samples if s.get("after_ready_s") is not None]
        ),
    }


def mirror_split(m: Json) -> Json:
    """The agent's phases of one Storage vMotion in seconds: prepare, copy (to every disk READY), the rest."""
    a = m.get("agent") or {}
    ph, total = a.get("phases_s") or {}, (m.get("total_ms") or 0) / 1000
    # the copy ends at the first sighting of every disk READY or of a later phase (a poll may miss both)
    ends = [x for x in (a.get("all_ready_s"), ph.get("pivot"), ph.get("finish"), ph.get("completed")) if x]
    if "copy" not in ph or not ends:
        return {"prepare_s": None, "copy_s": None, "after_ready_s": None, "write_blocking": None}
    ready = min(ends)
    return {"prepare_s": ph["copy"], "copy_s": round(ready - ph["copy"], 3),
            "after_ready_s": round(max(0.0, total - ready), 3),
            "write_blocking": (m.get("progress") or {}).get("write_blocking")}  # fmt: skip


# ---------------------------------------------------------------- 2. the pivot's stall


def _latency(answer: Json) -> Json:
    return ((answer.get("disklog") or {}).get("latency")) or {}


def bench_pivot(rec: LabRecord, api: VmshiftClient, moves: int, fails: Failures) -> Json:
    # 200 writes/s (one each 5 ms, back to back when a write takes longer): a stall cannot fall between
    g = Guest(
        "stor-pivot", Scenario("pivot", "pivot", 256, 1, "32,20", None), (64,), disklog_rate_per_s=PIVOT_RATE
    )
    create(api, g)
    ip, status = boot(rec, api, g)
    window_s = float(_latency(status).get("window_s") or 10)
    legs: list[Json] = []
    try:
        at, last_end = SHARED, time.monotonic()
        for i in range(moves):
            dst = LOCAL1 if at == SHARED else SHARED
            # The guest keeps one window (the last window_s seconds). Each move starts a full window
            # after the last one ended, so the window read just before it holds only quiet seconds:
            # the baseline of this move; the window read just after holds the move and quiet seconds
            # before it. A measurement interval, not a wait for a condition.
            time.sleep(max(0.0, window_s + 0.5 - (time.monotonic() - last_end)))
            before = guest_check(rec, ip)
            quiet = _latency(before)
            m = move(api, g.vm, dst, rec=rec)
            t_end = time.monotonic()
            after = guest_check(rec, ip)  # at once: the window must still hold the pivot
            read_after_s = time.monotonic() - t_end
            lat = _latency(after)
            boot_max_before, boot_max_after = (
                float(quiet.get("max_boot_ms") or 0),
                float(lat.get("max_boot_ms") or 0),
            )
            # a new worst-since-boot between the two reads happened during this move
            worst = max(
                float(lat.get("max_ms") or 0), boot_max_after if boot_max_after > boot_max_before else 0
            )
            fails.check(m["ok"], f"pivot move {i + 1} {at} -> {dst}: {m['status']} ({m['error']})")
            covered = m["wall_s"] + read_after_s <= window_s
            v = verify_running(rec, ip, before, g, fails, f"pivot move {i + 1} {at} -> {dst}")
            last_end = t_end
            legs.append({"n": i + 1, "path": f"{at} -> {dst}", "pivot_ms": m["pivot_ms"],
                         "total_ms": m["total_ms"], "worst_write_ms": worst,
                         "quiet_max_ms": float(quiet.get("max_ms") or 0), "quiet_window": quiet,
                         "window": lat,
                         "read_after_move_s": round(read_after_s, 3), "window_covers_move": covered,
                         "guest_ok": v["verified"], "move": m})  # fmt: skip
            say(
                f"  move {i + 1} {at} -> {dst}: pivot {m['pivot_ms']} ms, worst write {worst:.1f} ms "
                f"(quiet window before: max {quiet.get('max_ms')} ms), guest ok {v['verified']}"
            )
            at = dst
    finally:
        remove(api, g.vm)
    worsts = sorted(x["worst_write_ms"] for x in legs)
    quiets = sorted(x["quiet_max_ms"] for x in legs)
    pivots = [float(x["pivot_ms"]) for x in legs if x["pivot_ms"] is not None]
    return {
        "vm": g.vm,
        "disklog_rate_per_s": PIVOT_RATE,
        "window_s": window_s,
        "moves": legs,
        "worst_p99_ms": nearest_rank(worsts, 0.99),
        "worst_max_ms": max(worsts, default=None),
        "quiet_p99_ms": nearest_rank(quiets, 0.99),
        "quiet_max_ms": max(quiets, default=None),
        "raised_by_move": sum(1 for x in legs if x["worst_write_ms"] > x["quiet_max_ms"]),
        "pivot_p99_ms": nearest_rank(sorted(pivots), 0.99),
        "pivot_max_ms": max(pivots, default=None),
    }


def nearest_rank(sorted_xs: list[float], q: float) -> float | None:
    """The p-quantile by nearest rank, as the guest computes its own p99 (with 10 moves: the max)."""
    if not sorted_xs:
        return None
    k = max(1, math.ceil(q * len(sorted_xs)))
    return sorted_xs[min(k, len(sorted_xs)) - 1]


# ---------------------------------------------------------------- 3. sparse vs full, cold


def bench_sparse(rec: LabRecord, api: VmshiftClient, rounds: int, fails: Failures) -> Json:
    sc = Scenario("cold", "cold", 192, 1, "16,10", None)
    guests = {
        "sparse": Guest("stor-sparse", sc, (64, 4096), (Fill(1, 1024, 256),)),
        "full": Guest("stor-full", sc, (64, 256), (Fill(1, 0, 256),)),
    }
    durable: dict[str, int] = {}
    for key, g in guests.items():
        create(api, g)
        ip, _ = boot(rec, api, g)
        durable[key] = int((guest_check(rec, ip).get("disklog") or {}).get("durable_seq") or 0)
        power(api, g.vm, PowerAction.STOP, PowerState.POWERED_OFF)
        fill(disk_paths(rec, api, g.vm)[1], g.fills[0])
    legs = [
        ("host-1", LOCAL1, "same host"),
        ("host-2", LOCAL2, "other host (NBD)"),
        ("host-1", LOCAL1, "other host (NBD)"),
        ("host-1", SHARED, "same host"),
    ]
    samples: list[Json] = []
    try:
        for r in range(rounds):
            for n, (host, ds, path) in enumerate(legs):
                keys = ["sparse", "full"] if (r + n) % 2 == 0 else ["full", "sparse"]
                for key in keys:
                    g = guests[key]
                    src = api.get_vm(g.vm)
                    m = move(api, g.vm, ds, host, rec=rec)
                    what = f"cold {key} {src['host']}/{src['datastore']} -> {host}/{ds}"
                    fails.check(m["ok"], f"{what}: {m['status']} ({m['error']})")
                    v = verify_booted(rec, api, g, durable[key], fails, what)
                    durable[key] = v["durable_seq"]
                    samples.append(
                        {
                            "disk": key,
                            "path": path,
                            "from": m["from"],
                            "to": m["to"],
                            "ms": m["total_ms"],
                            "bytes_sent": m["bytes_sent"],
                            "move": m,
                            "guest_ok": v["verified"],
                        }
                    )
                    say(
                        f"  {what}: {m['total_ms']} ms, {m['bytes_sent']} bytes counted, "
                        f"guest ok {v['verified']}"
                    )
    finally:
        for g in guests.values():
            remove(api, g.vm)
    out: Json = {
        "guests": {
            k: {"vm": g.vm, "disks_mib": list(g.disks_mib), "data_mib": g.fills[0].length_mib}
            for k, g in guests.items()
        },
        "samples": samples,
    }
    for path in ("same host", "other host (NBD)"):
        for key in ("sparse", "full"):
            out[f"{key}_{'same' if path == 'same host' else 'nbd'}_ms"] = median(
                [s["ms"] for s in samples if s["disk"] == key and s["path"] == path and s["ms"]]
            )
    return out


# ---------------------------------------------------------------- 4. suspend vs dd


def bench_suspend(rec: LabRecord, api: VmshiftClient, reps: int, fails: Failures) -> Json:
    # 768 of 1024 MiB: with 896 the guest's OOM killer took the tester (kernel + initramfs live in RAM)
    g = Guest(
        "stor-suspend", Scenario("suspend", "suspend", 1024, 1, f"{SUSPEND_MEMTEST_MIB},150", None), (64,)
    )
    create(api, g)
    ip, _ = boot(rec, api, g)
    folder = rec.layout.datastores_dir / SHARED
    samples: list[Json] = []
    mib = SUSPEND_MEMTEST_MIB  # what dd writes before the first suspend; then what the last one wrote
    try:
        for rep in range(reps):
            before = guest_check(rec, ip)
            dd_before = dd_direct(folder, mib)  # with the VM running
            task = api.wait_task(api.suspend_vm(g.vm)["id"], timeout=600)
            fails.check(task["state"] == TaskState.SUCCESS, f"suspend {rep + 1}: {task.get('error')}")
            res: Json = task.get("result") or {}
            mib = max(1, round((res.get("written_bytes") or 0) / MIB))
            dd_after = dd_direct(folder, mib)  # with the VM suspended
            final = api.wait_task(api.resume_vm(g.vm)["id"], timeout=600)
            fails.check(final["state"] == TaskState.SUCCESS, f"resume {rep + 1}: {final.get('error')}")
            v = verify_running(rec, ip, before, g, fails, f"suspend/resume {rep + 1}")
            up_ok = float(guest_check(rec, ip).get("uptime_s") or 0) > float(before.get("uptime_s") or 0)
            fails.check(up_ok, f"suspend/resume {rep + 1}: the guest's uptime did not continue")
            samples.append({"rep": rep + 1, "suspend": res, "dd": [dd_before, dd_after],
                            "guest_ok": v["verified"] and up_ok, "memtest": v.get("memtest")})  # fmt: skip
            say(
                f"  suspend {rep + 1}: {res.get('written_bytes')} bytes in {res.get('save_s')} s "
                f"({(res.get('write_bps') or 0) / MIB:.0f} MiB/s), dd before/after "
                f"{(dd_before.get('bps') or 0) / MIB:.0f}/{(dd_after.get('bps') or 0) / MIB:.0f} MiB/s, "
                f"file {res.get('file_bytes')} bytes, guest ok {v['verified'] and up_ok}"
            )
    finally:
        remove(api, g.vm)
    return {
        "vm": g.vm,
        "memory_mib": 1024,
        "memtest": g.scenario.memtest,
        "samples": samples,
        "suspend_bps": median([s["suspend"]["write_bps"] for s in samples if s["suspend"].get("write_bps")]),
        "dd_bps": median([d["bps"] for s in samples for d in s["dd"] if d.get("bps")]),
        "file_bytes": max((s["suspend"].get("file_bytes") or 0 for s in samples), default=None),
        "allocated_bytes": max((s["suspend"].get("allocated_bytes") or 0 for s in samples), default=None),
        "memory_bytes": 1024 * MIB,
    }


# ---------------------------------------------------------------- the run

SECTIONS: dict[str, Callable[[LabRecord, VmshiftClient, int, Failures], Json]] = {
    "mirror": bench_mirror,
    "pivot": bench_pivot,
    "sparse": bench_sparse,
    "suspend": bench_suspend,
}
#: repetitions per section: (full run, --quick)
REPS = {"mirror": (3, 1), "pivot": (12, 4), "sparse": (2, 1), "suspend": (3, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, not a result)")
    ap.add_argument("--only", action="append", choices=list(SECTIONS), help="run only this section")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--label", help="a heading for the report, e.g. 'Smoke run on a shared machine'")
    args = ap.parse_args(argv)
    chosen = args.only or list(SECTIONS)
    name = f"stor{os.getpid() % 100000}"
    started = time.monotonic()
    fails = Failures()
    doc: Json = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([".venv/bin/python", "-m", "bench.storage", *(argv or sys.argv[1:])]),
        "quick": args.quick,
        "label": args.label,
        "machine": {**machine(), "loadavg_at_start": os.getloadavg()},
        "sections": {},
        "errors": {},
        "failures": fails.items,
    }
    say(f"lab {name}: up; sections: {', '.join(chosen)}")
    try:
        lab.up(name=name, hosts=2)
        rec = lab.get(name)
        for k in rec.layout.host_numbers:
            topology.set_migration_link_rate(rec.layout, k, None)  # unshaped: the copy's own speed
        with VmshiftClient(rec.server_url or "", rec.token or "", ca_file=rec.ca_file, timeout=60) as api:
            for section in chosen:
                reps = REPS[section][1 if args.quick else 0]
                say(f"{section}: {reps} repetition(s), load {os.getloadavg()[0]:.2f}")
                try:
                    result = SECTIONS[section](rec, api, reps, fails)
                    doc["sections"][section] = {"loadavg_1m_at_start": os.getloadavg()[0], **result}
                except (VmshiftError, OSError, KeyError, TypeError, ValueError) as e:
                    say(f"{section}: FAILED: {e}")
                    doc["errors"][section] = traceback.format_exc()
                write(args.out, doc, started)
    finally:
        say(f"lab {name}: down")
        doc["lab_teardown_problems"] = lab.down(name)
    write(args.out, doc, started)
    return 0 if not doc["errors"] and not fails.items else 1


def write(out: Path, doc: Json, started: float) -> None:
    doc["duration_s"] = round(time.monotonic() - started)
    doc["figures"] = storage_report.figures(doc)
    out.mkdir(parents=True, exist_ok=True)
    (out / "storage-latest.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (out / "storage-latest.md").write_text(storage_report.markdown(doc))
    say(f"wrote {out / 'storage-latest.json'} and storage-latest.md")


if __name__ == "__main__":
    raise SystemExit(main())
