"""Migration soak with injected faults (issue 7, item 2).

    sudo .venv/bin/python bench/soak.py --count 200 [--seed S] \
        --json bench/results/soak-latest.json --markdown bench/results/soak-latest.md

One lab of two hosts (named soak<pid>, always torn down, also on Ctrl-C or SIGTERM) runs three small
guests with different workloads (memtest size/rate, disklog on). Each of --count migrations moves a
random guest to the other host, on an unshaped link or a randomly shaped one, with one random fault
injected at a random phase:

- faults: none, kill the target or the source QEMU (SIGKILL), cut the source's migration link
  (restored after 0.5-14 s), SIGKILL the source or target agent (started again after 0.2-8 s),
  restart (SIGTERM + start) the source or target agent, restart the server, cancel through the API;
- phases: setup (right after the request: check/estimate/prepare), pre-copy (bytes moving; the link
  is shaped so pre-copy lasts seconds), switchover (the source agent is frozen with SIGSTOP in
  pre-copy until the target's QEMU holds the whole stream, paused: the fault lands between "last
  byte sent" and "target told to run", i.e. in the confirm phase; then the agent is thawed).
  Post-copy migrations are not part of the soak.

The phase the fault really hit is recorded from the records at that moment (server record, source
agent's loop, target's incoming stream), beside the intended one.

After each migration the soak acts as an operator: `needs_finalize` -> `migration finalize`; a VM
left paused -> its critical event is looked up, then `vm resume`; a `lost` VM (or one whose QEMU the
fault killed) -> `vm power start` from its disks; stopped components come back. Then the invariants:
exactly one QEMU of the VM (by host namespace), running, on the host the inventory names, listed by
that host's agent only (no stray incoming QEMU elsewhere); memtest 0 new mismatches after 2 more
passes; every durable disklog record present (the last durable_seq seen before the migration is
still there, or, after a restart from disk, the boot scan found it with no corrupt record).
Violations are recorded with the migration record, the VM's events, the fault, seed and iteration,
and the soak goes on. The seed is printed first and stored in the JSON: --seed replays a run's
choices (timing still differs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from soak_checks import (
    GuestState,
    Recovery,
    Violation,
    guest,
    judge_guest,
    judge_placement,
    recover,
    settle,
    wait_end,
    wait_task,
)
from soak_faults import FAULTS, PHASES, DualWatch, Injection, Injector, Lab, other, restore_components, retry

from vmshift.client import VmshiftClient
from vmshift.errors import VmshiftError
from vmshift.lab import lab as labmod
from vmshift.lab import topology
from vmshift.model.enums import PowerAction

Json = dict[str, Any]
REPO = Path(__file__).resolve().parent.parent
T0 = time.monotonic()
CODE = ""  # the commit under test, read once at start (set in main)
END_TIMEOUT_S = 200.0  # > the server's 120 s grace for a silent source agent


@dataclass(frozen=True)
class Guest:
    name: str
    memory_mib: int
    kernel_args: str
    home: str


GUESTS = (
    Guest("soak-a", 192, "vmshift.memtest=32,16 vmshift.disklog=1", "host-1"),
    Guest("soak-b", 256, "vmshift.memtest=64,32 vmshift.disklog=1", "host-2"),
    Guest("soak-c", 192, "vmshift.memtest=16,8 vmshift.disklog=1", "host-1"),
)


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Run:
    iteration: int
    vm: str
    source: str
    target: str
    fault: str
    intended_phase: str | None
    link: str | None
    migration_id: int | None = None
    injection: Json = field(default_factory=dict)
    status: str | None = None
    error: Json | None = None
    outcome: str | None = None
    recovery: list[str] = field(default_factory=list)
    host_after: str | None = None
    mismatches: int = 0
    lost_writes: int = 0
    lost_vm: int = 0
    duplicated_vm: int = 0
    violations: list[Json] = field(default_factory=list)
    transient_dual: list[Json] = field(default_factory=list)  # see DualWatch
    seconds: float = 0.0


@dataclass
class Totals:
    lost_vms: int = 0
    duplicated_vms: int = 0
    memtest_mismatches: int = 0
    lost_writes: int = 0
    violations: int = 0


def dirty_mbit(g: Guest) -> float:
    """The guest's memtest dirty rate in Mbit/s (vmshift.memtest=SIZE,RATE with RATE in MiB/s)."""
    rate = g.kernel_args.split("vmshift.memtest=")[1].split()[0].split(",")[1]
    return float(rate) * 8 * 1.048576


def plan(rng: random.Random, alive: list[str], faults: tuple[str, ...] = FAULTS,
         phases: tuple[str, ...] = PHASES) -> tuple[str, str, str | None, str | None]:
    vm = rng.choice(alive)
    fault = rng.choice(faults)
    phase = None if fault == "none" else rng.choice(phases)
    g = next(g for g in GUESTS if g.name == vm)
    if phase in ("precopy", "switchover", "confirm"):
        # pre-copy lasts seconds, yet converges without the policy's help (a frozen source agent
        # applies none): the link carries 2.5-5x what the guest dirties
        mbit = max(60.0, dirty_mbit(g) * rng.uniform(2.5, 5.0))
        link: str | None = f"{int(mbit // 10 * 10)}mbit"
    else:
        # now and then a shaped link that still carries 1.5-4x what the guest dirties
        shaped = max(100.0, dirty_mbit(g) * rng.uniform(1.5, 4.0))
        link = f"{int(shaped // 10 * 10)}mbit" if rng.random() < 0.25 else None
    return vm, fault, phase, link


def set_links(lab: Lab, rate: str | None) -> None:
    lay = lab.lay
    for k in lay.host_numbers:
        topology.set_migration_link_rate(lay, k, rate)


def one(lab: Lab, rng: random.Random, i: int, alive: list[str], uuids: dict[str, str], seed: int,
        faults: tuple[str, ...] = FAULTS, phases: tuple[str, ...] = PHASES) -> Run:
    t0 = time.monotonic()
    vm, fault, phase, link = plan(rng, alive, faults, phases)
    info = retry("vm", lambda: lab.api.get_vm(vm))
    src = str(info["host"])
    run = Run(i, vm, src, other(src), fault, phase, link)
    violations: list[Violation] = []
    before, answer = guest(lab, vm)
    if before is None:
        violations.append(Violation("guest_unreachable_before", f"{vm} did not answer before the migration",
                                    answer))
        before = GuestState(0, 0, 0, 0, 0, 0, 0, time.monotonic())
    set_links(lab, link)
    inj = Injection(fault, phase)
    try:
        started = retry("migrate", lambda: lab.api.migrate_vm(vm, run.target))
        run.migration_id = mid = int(started["migration_id"])
        injector = Injector(lab, rng, mid, int(started["id"]), uuids[vm], src, run.target)
        watch = DualWatch(lab, uuids[vm])
        watch.start()
        try:
            inj = injector.inject(fault, phase)
            m = wait_end(lab, mid, END_TIMEOUT_S)
        finally:
            both = watch.stop()
        run.transient_dual = watch.transient
        if both:
            run.duplicated_vm = 1
            violations.append(Violation("ran_twice", "both agents reported the VM running in two samples "
                                        "in a row",
                                        {"seen": both}))
        set_links(lab, None)
        if m is None:
            m = retry("migration", lambda: lab.api.get_migration(mid))
            violations.append(Violation("stuck_migration",
                                        f"migration {mid} still {m['status']}/{m['phase']} "
                                        f"after {END_TIMEOUT_S:.0f} s", {"migration": m}))
        run.status = str(m["status"])
        run.error = m.get("error")
        rec = Recovery()
        killed_qemu = inj.injected and fault in ("kill_source_qemu", "kill_target_qemu")
        m = recover(lab, vm, uuids[vm], m, rec, violations, killed_qemu)
        run.outcome = str(m["status"])
        if rec.rebooted and not (killed_qemu or run.status == "lost"):
            violations.append(Violation("vm_stopped", f"{vm} was off after a {fault} fault and had to be "
                                        "started again", {"migration": m}))
        run.recovery = rec.actions
        task = wait_task(lab, int(started["id"]), timeout=30)
        if task["state"] in ("running", "queued", "timeout"):
            violations.append(Violation("stuck_task", f"task {started['id']} still {task['state']} after the "
                                        "migration ended", {"task": task}))
        p = settle(lab, vm, uuids[vm])
        run.host_after = p.host
        run.lost_vm, dup = judge_placement(p, violations)
        run.duplicated_vm = max(run.duplicated_vm, dup)
        if p.ok:
            g = next(g for g in GUESTS if g.name == vm)
            size, rate = g.kernel_args.split("vmshift.memtest=")[1].split()[0].split(",")
            verdict = judge_guest(lab, vm, before, rec.rebooted, violations, float(size) / float(rate))
            run.mismatches, run.lost_writes = verdict.mismatches, verdict.lost_writes
    except Exception as e:  # the soak goes on; a step that broke is reported as such
        violations.append(Violation("soak_step_failed", f"{type(e).__name__}: {e}",
                                    {"traceback": traceback.format_exc()[-2000:]}))
    finally:
        set_links(lab, None)
        restore_components(lab, inj.notes)
    run.injection = asdict(inj)
    if violations:
        m_full: Json = {}
        events: list[Json] = []
        try:
            if run.migration_id is not None:
                m_full = lab.api.get_migration(run.migration_id)
            events = lab.api.list_events(limit=30, target=vm)
        except VmshiftError as e:
            m_full = {"error": str(e)}
        for v in violations:
            run.violations.append({"kind": v.kind, "message": v.message, "seed": seed, "iteration": i,
                                   "vm": vm, "fault": fault, "intended_phase": phase,
                                   "phase_hit": inj.phase_hit, "injection": asdict(inj), "detail": v.detail,
                                   "migration": m_full, "events": events})
    run.seconds = round(time.monotonic() - t0, 1)
    return run


def ensure_running(lab: Lab, vm: str) -> bool:
    """Bring a VM the soak could not recover back to running, if at all possible."""
    try:
        info = lab.api.get_vm(vm)
        if info.get("power_state") == "paused":
            try:
                wait_task(lab, int(lab.api.resume_vm(vm, force=True)["id"]))
            except VmshiftError as e:
                say(f"{vm}: vm resume --force refused ({e}): power stop + start")
                wait_task(lab, int(lab.api.power_vm(vm, PowerAction.STOP)["id"]))
        if lab.api.get_vm(vm).get("power_state") in ("poweredOff", "missing"):
            wait_task(lab, int(lab.api.power_vm(vm, PowerAction.START)["id"]))
        return lab.api.get_vm(vm).get("power_state") == "poweredOn"
    except VmshiftError as e:
        say(f"{vm}: could not bring it back: {e}")
        return False


# ---------------------------------------------------------------- report


def summarize(runs: list[Run], seed: int, count: int, duration: float, lab_name: str, interrupted: bool,
              setup_error: str | None, selection: str = "") -> Json:
    t = Totals()
    by_fault: Json = {}
    for f in FAULTS:
        by_fault[f] = {"runs": 0, "by_phase": {}, "by_intended_phase": {}, "outcomes": {}, "recoveries": {},
                       "violations": 0}
    for r in runs:
        t.lost_vms += r.lost_vm
        t.duplicated_vms += r.duplicated_vm
        t.memtest_mismatches += r.mismatches
        t.lost_writes += r.lost_writes
        t.violations += len(r.violations)
        b = by_fault[r.fault]
        b["runs"] += 1
        hit = str(r.injection.get("phase_hit") or ("-" if r.fault == "none" else "not_injected"))
        b["by_phase"][hit] = b["by_phase"].get(hit, 0) + 1
        want = str(r.intended_phase or "-")
        b["by_intended_phase"][want] = b["by_intended_phase"].get(want, 0) + 1
        out = str(r.status) + (f" -> {r.outcome}" if r.outcome != r.status else "")
        b["outcomes"][out] = b["outcomes"].get(out, 0) + 1
        for a in r.recovery:
            key = a.split(":")[0].split(" ")[0:2]
            k = " ".join(key)
            b["recoveries"][k] = b["recoveries"].get(k, 0) + 1
        b["violations"] += len(r.violations)
    return {
        "migrations": len(runs), "requested": count, "seed": seed, "lab": lab_name,
        "command": f".venv/bin/python bench/soak.py --count {count} --seed {seed}{selection}",
        "started_at": None, "code": CODE, "interrupted": interrupted, "setup_error": setup_error,
        "guests": [asdict(g) for g in GUESTS],
        "lost_vms": t.lost_vms, "duplicated_vms": t.duplicated_vms,
        "memtest_mismatches": t.memtest_mismatches, "lost_writes": t.lost_writes,
        "violation_count": t.violations,
        "by_fault": by_fault,
        "violations": [v for r in runs for v in r.violations],
        "duration_s": round(duration, 1),
        "mean_s_per_migration": round(duration / len(runs), 1) if runs else None,
        "runs": [asdict(r) for r in runs],
    }


def code_version() -> str:
    import subprocess

    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "src"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return head + (" (src/ with uncommitted changes)" if dirty else "")


def markdown(s: Json) -> str:
    lines = [
        "# Migration soak with injected faults", "",
        f"`{s['command']}` — {s['migrations']} migrations in {s['duration_s']} s "
        f"({s['mean_s_per_migration']} s each), code {s['code']}, started {s['started_at']}.", "",
        "| lost VMs | duplicated VMs | memtest mismatches | lost durable writes | violations |",
        "|---|---|---|---|---|",
        f"| {s['lost_vms']} | {s['duplicated_vms']} | {s['memtest_mismatches']} | {s['lost_writes']} | "
        f"{s['violation_count']} |", "",
        "## By fault", "",
        "| fault | runs | phase hit | outcomes (status -> after recovery) | operator actions | violations |",
        "|---|---|---|---|---|---|",
    ]

    def cell(d: Json) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(d.items())) or "-"

    for f, b in s["by_fault"].items():
        lines.append(f"| {f} | {b['runs']} | {cell(b['by_phase'])} | {cell(b['outcomes'])} | "
                     f"{cell(b['recoveries'])} | {b['violations']} |")
    phases: dict[str, dict[str, int]] = {}
    for f, b in s["by_fault"].items():
        for p, n in b["by_phase"].items():
            phases.setdefault(p, {})[f] = n
    lines += ["", "## By phase hit", "", "| phase hit | runs | faults |", "|---|---|---|"]
    for p, d in sorted(phases.items()):
        lines.append(f"| {p} | {sum(d.values())} | {cell(d)} |")
    lines += ["", "## Violations", ""]
    if not s["violations"]:
        lines.append("None.")
    for v in s["violations"]:
        m = v.get("migration") or {}
        err = (m.get("error") or {}).get("message") if isinstance(m, dict) else None
        lines.append(f"- iteration {v['iteration']} (seed {v['seed']}), {v['vm']}, {v['fault']} at "
                     f"{v['intended_phase']} (hit {v['phase_hit']}): **{v['kind']}** — {v['message']}; "
                     f"migration {m.get('id')} {m.get('status')}/{m.get('phase')}"
                     + (f": {err}" if err else ""))
    return "\n".join(lines) + "\n"


def write(summary: Json, json_path: Path, md_path: Path | None) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if md_path:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(markdown(summary))


# ---------------------------------------------------------------- main


def _sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def setup_guests(lab: Lab) -> dict[str, str]:
    uuids = {}
    for g in GUESTS:
        task = lab.api.create_vm({
            "name": g.name, "host": g.home, "cpus": 1, "memory_mib": g.memory_mib, "datastore": "shared-1",
            "networks": ["VM Network"], "disks_mib": [64], "image": "lab-guest", "start": True,
            "kernel_args": g.kernel_args,
        })
        final = lab.api.wait_task(task["id"], timeout=300)
        if final["state"] != "success":
            raise VmshiftError(f"Creating {g.name} failed: {final.get('error')}")
        uuids[g.name] = str(lab.api.get_vm(g.name)["uuid"])
    for g in GUESTS:
        if guest(lab, g.name, wait_s=120)[0] is None:
            raise VmshiftError(f"{g.name} did not answer after booting")
    return uuids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--seed", type=int, default=None, help="replay the choices of an earlier run")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "soak-latest.json")
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--name", default=f"soak{os.getpid()}", help="lab name")
    ap.add_argument("--faults", default=",".join(FAULTS),
                    help="comma-separated subset of: " + ", ".join(FAULTS))
    ap.add_argument("--phases", default=",".join(PHASES),
                    help="comma-separated subset of: " + ", ".join(PHASES))
    args = ap.parse_args(argv)
    faults, phases = tuple(args.faults.split(",")), tuple(args.phases.split(","))
    if not set(faults) <= set(FAULTS) or not set(phases) <= set(PHASES):
        ap.error(f"--faults must be among {FAULTS}, --phases among {PHASES}")
    selection = (f" --faults {args.faults}" if faults != FAULTS else "") + \
        (f" --phases {args.phases}" if phases != PHASES else "")
    if os.geteuid() != 0:
        print("The soak builds network namespaces: run it as root.", file=sys.stderr)
        return 2
    global CODE
    CODE = code_version()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    say(f"seed {seed} (replay with --seed {seed}); lab {args.name}; {args.count} migrations")
    signal.signal(signal.SIGTERM, _sigterm)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    runs: list[Run] = []
    interrupted, setup_error = False, None
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vmshift-soak-config-") as config_dir:
        os.environ["VMSHIFT_CONFIG_DIR"] = config_dir
        try:
            rec = labmod.up(args.name, hosts=2, progress=lambda msg: say(f"lab up: {msg}"))
            api = VmshiftClient(rec.server_url or "", rec.token or "", ca_file=rec.ca_file, timeout=30)
            lab = Lab(args.name, api)
            uuids = setup_guests(lab)
            say("guests up: " + ", ".join(f"{g.name} ({g.memory_mib} MiB, {g.kernel_args})" for g in GUESTS))
            alive = [g.name for g in GUESTS]
            t_start = time.monotonic()
            tot = Totals()
            for i in range(1, args.count + 1):
                if not alive:
                    setup_error = "every guest is gone"
                    break
                # one generator per iteration: a run that diverged (a fault not reached, a VM gone)
                # still replays every later iteration's choices
                r = one(lab, random.Random(f"{seed}:{i}"), i, alive, uuids, seed, faults, phases)
                runs.append(r)
                tot.lost_vms += r.lost_vm
                tot.duplicated_vms += r.duplicated_vm
                tot.memtest_mismatches += r.mismatches
                tot.lost_writes += r.lost_writes
                tot.violations += len(r.violations)
                hit = r.injection.get("phase_hit")
                kinds = ",".join(v["kind"] for v in r.violations)
                say(f"#{i} {r.vm} {r.source}->{r.target} link={r.link or 'free'} fault={r.fault}"
                    f"@{r.intended_phase or '-'} hit={hit or '-'} -> {r.status}"
                    + (f" -> {r.outcome}" if r.outcome != r.status else "")
                    + (f" [{'; '.join(r.recovery)}]" if r.recovery else "")
                    + (f" ({(r.error or {}).get('message', '')[:90]})" if r.error else "")
                    + f" {r.seconds} s" + (f" VIOLATION {kinds}" if kinds else "")
                    + f" | lost {tot.lost_vms} dup {tot.duplicated_vms} mism {tot.memtest_mismatches}"
                    f" lostw {tot.lost_writes} viol {tot.violations}")
                if r.violations and not ensure_running(lab, r.vm):
                    say(f"{r.vm} leaves the soak: it cannot be brought back")
                    alive.remove(r.vm)
                if i % 10 == 0:
                    s = summarize(runs, seed, args.count, time.monotonic() - t_start, args.name, False, None,
                                  selection)
                    s["started_at"] = started_at
                    write(s, args.json, args.markdown)
        except KeyboardInterrupt:
            interrupted = True
            say("interrupted: tearing the lab down")
        except Exception as e:
            setup_error = f"{type(e).__name__}: {e}"
            say(f"soak stopped: {setup_error}\n{traceback.format_exc()}")
        finally:
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                problems = labmod.down(args.name)
                if problems:
                    say(f"lab down: {problems}")
            finally:
                signal.signal(signal.SIGINT, previous)
    summary = summarize(runs, seed, args.count, time.monotonic() - t_start, args.name, interrupted,
                        setup_error, selection)
    summary["started_at"] = started_at
    write(summary, args.json, args.markdown)
    say(f"seed {seed}: {summary['migrations']} migrations, lost {summary['lost_vms']}, duplicated "
        f"{summary['duplicated_vms']}, memtest mismatches {summary['memtest_mismatches']}, lost writes "
        f"{summary['lost_writes']}, violations {summary['violation_count']}; wrote {args.json}")
    if interrupted:
        return 130
    bad = summary["lost_vms"] or summary["duplicated_vms"] or summary["memtest_mismatches"] \
        or summary["lost_writes"] or summary["violation_count"] or setup_error
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
