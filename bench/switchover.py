"""Benchmark: the blackout a client feels at a switchover, beside QEMU's downtime (issue 6, item 3).

    sudo .venv/bin/python bench/switchover.py [--count 10] [--baseline-ref e401e28 | --no-baseline]
        [--json bench/results/switchover-DATE.json]

For each side (the code of this working tree, then the code of --baseline-ref) one lab of two hosts
comes up with that side's own `vmshift lab up`, runs --count migrations of the demo guest back and
forth between host-1 and host-2 on an unshaped link, and is always torn down, also on Ctrl-C. Labs
run one after the other, never together: the machine has two cores.

During each migration a 1 ms UDP echo probe runs from the client namespace. Per migration it records
QEMU's downtime (metrics.downtime_ms), the probe's longest gap, the difference, the total time and the
switchover timeline of the migration record (when the server provides one), with the probe's gap on
the same axis. After each migration the guest must finish two more memtest passes with 0 mismatches
and its disklog must have advanced.

The baseline runs from a `git worktree` of the ref with its own venv (`pip install -e`, constrained to
the package versions of the venv running this script), so its server, agents and QEMU command lines
are the old ones; the probes and this script are the same for both sides, so only the system under
test differs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from vmshift.client import VmshiftClient
from vmshift.errors import VmshiftError
from vmshift.lab.probe import udp_probe_process
from vmshift.model.enums import TaskState
from vmshift.model.migration import MigrationStatus

Json = dict[str, Any]
REPO = Path(__file__).resolve().parent.parent
DEFAULT_BASELINE_REF = "e401e28"  # the last landed commit before issue 6's work
VM = "bsw-web"
VM_MEMORY_MIB = 256
VM_KERNEL_ARGS = "vmshift.memtest=64,50 vmshift.disklog=1"
GOAL_GAP_MINUS_DOWNTIME_P95_MS = 50.0
GOAL_DOWNTIME_P95_MS = 100.0
PROBE_WARMUP_S = 0.5  # lets the probe see replies before the migration starts
MEMTEST_PASSES_AFTER = 2
# The server's timeline marks (source_stopped, last_byte_sent, confirm_sent, target_loaded, target_cont,
# first_announce) are taken as they come; these two are the probe's, put on the same axis.
PROBE_MARKS = ("probe_last_reply_before_gap", "probe_first_reply_after_gap")
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- sides and labs


@dataclass(frozen=True)
class Side:
    """One version of vmshift under test: its label, what code it is and its `vmshift` executable."""

    label: str
    code: str
    vmshift: Path


@dataclass(frozen=True)
class LabInfo:
    name: str
    server: str
    token: str
    client_ns: str
    ca_file: str | None = None  # None: a side from before the server served HTTPS


def _run(cmd: list[str], timeout: float, *, new_session: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                          start_new_session=new_session)


def _json_out(proc: subprocess.CompletedProcess[str], what: str) -> Json:
    try:
        data: Json = json.loads(proc.stdout)
    except ValueError as e:
        raise VmshiftError(f"{what} printed no JSON (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-500:]}") from e
    if proc.returncode != 0 or "error" in data:
        err = data.get("error") or {}
        hint = str(err.get("hint") or "").splitlines()[:1]
        raise VmshiftError(f"{what} failed: {err.get('message', data)}" + (f" ({hint[0]})" if hint else ""))
    return data


def lab_up(side: Side, name: str) -> LabInfo:
    up = _json_out(_run([str(side.vmshift), "lab", "up", "--name", name, "--hosts", "2", "--json"], 900),
                   f"{side.label}: vmshift lab up")
    env = _json_out(_run([str(side.vmshift), "lab", "env", "--name", name, "--json"], 60),
                    f"{side.label}: vmshift lab env")
    return LabInfo(name, str(env["VMSHIFT_SERVER"]), str(env["VMSHIFT_TOKEN"]), str(up["client_namespace"]),
                   env.get("VMSHIFT_CA_FILE"))


def lab_down(side: Side, name: str) -> list[str]:
    """Tear the lab down; a second Ctrl-C while this runs does not interrupt it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = _run([str(side.vmshift), "lab", "down", "--name", name, "--json"], 600, new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        problems = [str(p) for p in json.loads(proc.stdout).get("problems", [])]
    except (ValueError, AttributeError):
        problems = [f"lab down exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}"]
    return problems


@contextlib.contextmanager
def baseline_side(ref: str) -> Iterator[Side]:
    """A git worktree of `ref` with its own venv, removed afterwards."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                            capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="vmshift-bsw-baseline-") as tmp:
        src, venv = Path(tmp) / "src", Path(tmp) / "venv"
        say(f"baseline: worktree of {ref} ({commit[:12]}) in {src}")
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(src), commit],
                       capture_output=True, text=True, check=True)
        try:
            say("baseline: venv and pip install -e, pinned to this venv's package versions")
            subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
            pins = Path(tmp) / "constraints.txt"
            pins.write_text(subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
                                           capture_output=True, text=True, check=True).stdout)
            pip = _run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(pins), "-e", str(src)], 900)
            if pip.returncode != 0:
                raise VmshiftError(f"pip install -e of {ref} failed: {pip.stderr.strip()[-800:]}")
            yield Side("baseline", f"{ref} ({commit[:12]})", venv / "bin" / "vmshift")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(src)],
                           capture_output=True, check=False)
            subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], capture_output=True, check=False)


def current_side() -> Side:
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    code = f"working tree at {head}" + (" (with uncommitted changes)" if dirty else "")
    return Side("current", code, Path(sys.executable).parent / "vmshift")


# ---------------------------------------------------------------- guest


def guest_check(ns: str, ip: str, wait_s: float = 30.0) -> Json:
    """`python -m vmshift.lab.probe check IP` in the client namespace, until the guest answers."""
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "vmshift.lab.probe", "check", ip]
    deadline = time.monotonic() + wait_s
    while True:
        proc = _run(cmd, 60)
        try:
            answer: Json = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            answer = {"echo": False, "error": proc.stderr.strip()[-300:]}
        if (answer.get("echo") and "error" not in answer) or time.monotonic() >= deadline:
            return answer
        time.sleep(1.0)


def wait_memtest_passes(ns: str, ip: str, passes: int, timeout_s: float = 120.0) -> Json:
    deadline = time.monotonic() + timeout_s
    while True:
        answer = guest_check(ns, ip)
        if answer.get("echo") and (answer.get("memtest") or {}).get("passes", 0) >= passes:
            return answer
        if time.monotonic() > deadline:
            raise VmshiftError(f"memtest did not reach {passes} passes within {timeout_s:.0f} s: {answer}")
        time.sleep(1.0)


def create_guest(api: VmshiftClient) -> str:
    task = api.create_vm({
        "name": VM, "host": "host-1", "cpus": 1, "memory_mib": VM_MEMORY_MIB, "datastore": "shared-1",
        "networks": ["VM Network"], "disks_mib": [64], "image": "lab-guest", "start": True,
        "kernel_args": VM_KERNEL_ARGS,
    })
    final = api.wait_task(task["id"], timeout=300)
    if final["state"] != TaskState.SUCCESS:
        raise VmshiftError(f"Creating VM {VM} failed: {final.get('error')}")
    return str(api.get_vm(VM)["ip"])


# ---------------------------------------------------------------- one migration


@dataclass
class Leg:
    index: int
    source: str
    target: str
    migration_id: int | None = None
    status: str = "not started"
    error: str | None = None
    downtime_ms: float | None = None
    total_ms: float | None = None
    task_ms: float | None = None
    rounds: int | None = None
    udp_max_gap_ms: float | None = None
    udp_lost: int | None = None
    gap_minus_downtime_ms: float | None = None
    timeline: dict[str, float] = field(default_factory=dict)  # epoch seconds, as the server gave them
    timeline_reference: str | None = None
    timeline_ms: dict[str, float] = field(default_factory=dict)  # relative to timeline_reference
    udp: Json = field(default_factory=dict)  # the probe's report (max_gap_start/end in epoch seconds)
    memtest_mismatches: int | None = None
    disklog_before: int | None = None
    disklog_after: int | None = None
    guest_ok: bool = False  # memtest 0 mismatches after two more passes, and disklog advanced


def relative_timeline(timeline: dict[str, float], udp: Json) -> tuple[str | None, dict[str, float]]:
    """Every mark in ms from source_stopped (else from the probe's last reply before its gap)."""
    marks = {k: float(v) for k, v in timeline.items() if isinstance(v, int | float)}
    if isinstance(udp.get("max_gap_start"), int | float) and isinstance(udp.get("max_gap_end"), int | float):
        marks[PROBE_MARKS[0]] = float(udp["max_gap_start"])
        marks[PROBE_MARKS[1]] = float(udp["max_gap_end"])
    reference = "source_stopped" if "source_stopped" in marks else (
        PROBE_MARKS[0] if PROBE_MARKS[0] in marks else None)
    if reference is None:
        return None, {}
    zero = marks[reference]
    ordered = sorted(marks.items(), key=lambda kv: kv[1])
    return reference, {k: round((v - zero) * 1000, 1) for k, v in ordered}


def migrate_once(api: VmshiftClient, lab: LabInfo, ip: str, index: int) -> Leg:
    source = str(api.get_vm(VM)["host"])
    target = "host-2" if source == "host-1" else "host-1"
    leg = Leg(index, source, target)
    before = guest_check(lab.client_ns, ip)
    leg.disklog_before = (before.get("disklog") or {}).get("durable_seq")
    udp = udp_probe_process(lab.client_ns, ip)
    m: Json = {}
    try:
        time.sleep(PROBE_WARMUP_S)
        t_start = time.monotonic()
        started = api.migrate_vm(VM, target)
        leg.migration_id = int(started["migration_id"])
        api.wait_task(started["id"], timeout=600)
        leg.task_ms = round((time.monotonic() - t_start) * 1000, 1)
        m = api.get_migration(leg.migration_id)
        if m["status"] == MigrationStatus.COMPLETED:
            guest_check(lab.client_ns, ip)  # the guest answers from its new host before the probe stops
    finally:
        udp_report = udp.stop()
    leg.status = str(m.get("status"))
    leg.error = (m.get("error") or {}).get("message")
    metrics = m.get("metrics") or {}
    leg.downtime_ms, leg.total_ms, leg.rounds = (
        metrics.get("downtime_ms"), metrics.get("total_ms"), metrics.get("rounds"))
    leg.udp = udp_report
    leg.udp_max_gap_ms, leg.udp_lost = udp_report.get("max_gap_ms"), udp_report.get("lost")
    if leg.downtime_ms is not None and leg.udp_max_gap_ms is not None:
        leg.gap_minus_downtime_ms = round(leg.udp_max_gap_ms - leg.downtime_ms, 1)
    leg.timeline = {k: float(v) for k, v in (m.get("timeline") or {}).items() if isinstance(v, int | float)}
    leg.timeline_reference, leg.timeline_ms = relative_timeline(leg.timeline, udp_report)
    if leg.status == MigrationStatus.COMPLETED:
        arrived = guest_check(lab.client_ns, ip)
        passes = int((arrived.get("memtest") or {}).get("passes", 0)) + MEMTEST_PASSES_AFTER
        after = wait_memtest_passes(lab.client_ns, ip, passes)
        leg.memtest_mismatches = (after.get("memtest") or {}).get("mismatches")
        leg.disklog_after = (after.get("disklog") or {}).get("durable_seq")
        leg.guest_ok = (leg.memtest_mismatches == 0 and leg.disklog_before is not None
                        and leg.disklog_after is not None and leg.disklog_after > leg.disklog_before)
    return leg


# ---------------------------------------------------------------- one side


@dataclass
class SideResult:
    side: Side
    lab: str
    legs: list[Leg] = field(default_factory=list)
    error: str | None = None
    interrupted: bool = False
    teardown_problems: list[str] = field(default_factory=list)


def run_side(side: Side, count: int) -> SideResult:
    name = f"bsw{os.urandom(3).hex()}"
    result = SideResult(side, name)
    say(f"{side.label}: lab {name} up ({side.code})")
    try:
        lab = lab_up(side, name)
        with VmshiftClient(lab.server, lab.token, ca_file=lab.ca_file, timeout=60) as api:
            say(f"{side.label}: creating {VM} ({VM_MEMORY_MIB} MiB, {VM_KERNEL_ARGS})")
            ip = create_guest(api)
            wait_memtest_passes(lab.client_ns, ip, 1, timeout_s=300)
            for i in range(1, count + 1):
                leg = migrate_once(api, lab, ip, i)
                result.legs.append(leg)
                say(f"{side.label} #{i} {leg.source} -> {leg.target}: {leg.status}, "
                    f"downtime {leg.downtime_ms} ms, UDP gap {leg.udp_max_gap_ms} ms, "
                    f"gap - downtime {leg.gap_minus_downtime_ms} ms, memtest mismatches "
                    f"{leg.memtest_mismatches}, disklog {leg.disklog_before} -> {leg.disklog_after}")
    except KeyboardInterrupt:
        result.error, result.interrupted = "interrupted", True
        say(f"{side.label}: interrupted")
    except Exception as e:  # recorded in the report; the other side still runs
        result.error = f"{type(e).__name__}: {e}"
        say(f"{side.label}: stopped: {result.error}")
    finally:
        say(f"{side.label}: lab {name} down")
        result.teardown_problems = lab_down(side, name)
        for p in result.teardown_problems:
            say(f"{side.label}: left over: {p}")
    return result


# ---------------------------------------------------------------- report


def spread(values: list[float]) -> Json:
    """p50 / p95 / max (percentiles interpolated between ranks, like numpy's default)."""
    if not values:
        return {"n": 0, "p50": None, "p95": None, "max": None}
    if len(values) == 1:
        return {"n": 1, "p50": values[0], "p95": values[0], "max": values[0]}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"n": len(values), "p50": round(q[49], 1), "p95": round(q[94], 1), "max": round(max(values), 1)}


def summarize(r: SideResult) -> Json:
    done = [leg for leg in r.legs if leg.status == MigrationStatus.COMPLETED]

    def values(attr: str) -> list[float]:
        return [float(v) for leg in done if (v := getattr(leg, attr)) is not None]

    gap_minus = spread(values("gap_minus_downtime_ms"))
    downtime = spread(values("downtime_ms"))
    timeline: Json = {}
    for leg in done:
        if leg.timeline_reference == "source_stopped":
            for mark, ms in leg.timeline_ms.items():
                timeline.setdefault(mark, []).append(ms)
    return {
        "migrations": len(r.legs), "completed": len(done),
        "guest_ok": sum(leg.guest_ok for leg in done),
        "gap_minus_downtime_ms": gap_minus, "downtime_ms": downtime,
        "udp_max_gap_ms": spread(values("udp_max_gap_ms")), "total_ms": spread(values("total_ms")),
        "goal_gap_minus_downtime_met": gap_minus["p95"] is not None
        and gap_minus["p95"] <= GOAL_GAP_MINUS_DOWNTIME_P95_MS,
        "goal_downtime_met": downtime["p95"] is not None and downtime["p95"] <= GOAL_DOWNTIME_P95_MS,
        "timeline_ms_from_source_stopped": {k: spread(v) for k, v in timeline.items()},
    }


def _cell(v: Any) -> str:
    return "-" if v is None else str(v)


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows)]


SUMMARY_ROWS = (("gap_minus_downtime_ms", "longest UDP gap - downtime, ms"),
                ("downtime_ms", "QEMU downtime, ms"),
                ("udp_max_gap_ms", "longest UDP gap, ms"),
                ("total_ms", "total time, ms"))


def summary_table(results: list[SideResult], summaries: list[Json]) -> list[str]:
    head = ["metric", *(f"{r.side.label} {q}" for r in results for q in ("p50", "p95", "max"))]
    rows = [[label, *(s[key][q] for s in summaries for q in ("p50", "p95", "max"))]
            for key, label in SUMMARY_ROWS]
    out = _table(head, rows)
    for r, s in zip(results, summaries, strict=True):
        gap_ok = "met" if s["goal_gap_minus_downtime_met"] else "NOT met"
        down_ok = "met" if s["goal_downtime_met"] else "NOT met"
        out.append(f"\nGoals, {r.side.label}: p95(gap - downtime) <= {GOAL_GAP_MINUS_DOWNTIME_P95_MS:g} ms "
                   f"{gap_ok}; p95(downtime) <= {GOAL_DOWNTIME_P95_MS:g} ms {down_ok}.")
    return out


def legs_table(r: SideResult) -> list[str]:
    head = ["#", "leg", "status", "downtime", "UDP gap", "gap - downtime", "total", "UDP lost",
            "memtest mismatches", "disklog", "timeline, ms"]
    rows = []
    for leg in r.legs:
        marks = ", ".join(f"{k} {v:+g}" for k, v in leg.timeline_ms.items()) or None
        if marks and leg.timeline_reference != "source_stopped":
            marks = f"(no server timeline) {marks}"
        rows.append([leg.index, f"{leg.source} -> {leg.target}", leg.status, leg.downtime_ms,
                     leg.udp_max_gap_ms, leg.gap_minus_downtime_ms, leg.total_ms, leg.udp_lost,
                     leg.memtest_mismatches,
                     f"{_cell(leg.disklog_before)} -> {_cell(leg.disklog_after)}", marks])
    return _table(head, rows)


def timeline_table(summary: Json) -> list[str]:
    """One row per mark, in the order of their median time: the switchover as it usually unfolds."""
    tl: Json = summary["timeline_ms_from_source_stopped"]
    marks = sorted(tl, key=lambda k: (tl[k]["p50"], k))
    rows = [[m, tl[m]["p50"], tl[m]["p95"], tl[m]["max"]] for m in marks]
    return _table(["mark", "p50", "p95", "max"], rows)


def markdown(results: list[SideResult], summaries: list[Json]) -> str:
    out = ["## Switchover: the client's longest UDP gap vs QEMU's downtime", ""]
    for r, s in zip(results, summaries, strict=True):
        out.append(f"- {r.side.label}: {r.side.code}, lab {r.lab}: {s['completed']}/{s['migrations']} "
                   f"completed, guest verified after {s['guest_ok']}"
                   + (f"; stopped early: {r.error}" if r.error else ""))
    out += ["", *summary_table(results, summaries)]
    for r, s in zip(results, summaries, strict=True):
        out += ["", f"### {r.side.label}: each migration (timeline in ms from source_stopped)", "",
                *legs_table(r)]
        if s["timeline_ms_from_source_stopped"]:
            out += ["", f"### {r.side.label}: timeline over all migrations, ms from source_stopped", "",
                    *timeline_table(s)]
    return "\n".join(out)


# ---------------------------------------------------------------- main


def _sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # so that every finally (lab down, worktree removal) runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--count", type=int, default=10, help="migrations per side (alternating hosts)")
    ap.add_argument("--baseline-ref", default=DEFAULT_BASELINE_REF, help="git ref of the code to compare")
    ap.add_argument("--no-baseline", action="store_true", help="measure the current code only")
    ap.add_argument("--json", type=Path, help="results file (default: bench/results/switchover-DATE.json)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("The benchmark builds network namespaces: run it as root.", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    started_at = datetime.now(UTC)
    out_path = args.json or REPO / "bench" / "results" / f"switchover-{started_at.date().isoformat()}.json"
    results: list[SideResult] = []
    # Our labs must not repoint the CLI context of whoever else uses this machine.
    with tempfile.TemporaryDirectory(prefix="vmshift-bsw-config-") as config_dir:
        os.environ["VMSHIFT_CONFIG_DIR"] = config_dir
        try:
            results.append(run_side(current_side(), args.count))
            if not args.no_baseline and not results[-1].interrupted:
                with baseline_side(args.baseline_ref) as base:
                    results.append(run_side(base, args.count))
        except KeyboardInterrupt:
            say("interrupted while preparing the baseline")
    summaries = [summarize(r) for r in results]
    report = {
        "started_at": started_at.isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "machine": "2 cores, TCG",
        "vm": {"name": VM, "memory_mib": VM_MEMORY_MIB, "kernel_args": VM_KERNEL_ARGS},
        "goals": {"gap_minus_downtime_p95_ms": GOAL_GAP_MINUS_DOWNTIME_P95_MS,
                  "downtime_p95_ms": GOAL_DOWNTIME_P95_MS},
        "sides": [{**asdict(r), "side": {k: str(v) for k, v in asdict(r.side).items()}, "summary": s}
                  for r, s in zip(results, summaries, strict=True)],
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(markdown(results, summaries))
    say(f"wrote {out_path}")
    if any(r.interrupted for r in results):
        return 130
    ok = len(results) == (1 if args.no_baseline else 2) and all(
        r.error is None and not r.teardown_problems for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
