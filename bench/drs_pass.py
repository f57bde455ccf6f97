"""`make bench-drs`: what one DRS pass costs and what DRS does over a simulated day (issue 11).

Pure computation over simulated clusters (no lab, no server, no QEMU):

- ``pass``: one pass over 96 hosts x 10,000 VMs with 500 rules, in a state that makes it work (every
  host's imbalance has persisted, so the balancing phase runs); the target is <= 1 s on 2 cores.
  Timed from the snapshot to the answer (building the working state included), best and median of
  ``--repeat`` runs.
- ``growth``: the same at 8 .. 96 hosts (~104 VMs per host, rules in proportion); a PNG.
- ``day``: a day of shifting load (each VM follows the daily curve of its application group, which
  peak at different hours, plus noise), one pass a minute, on ``--day-hosts`` hosts; vmshift's
  recommender (cost-benefit, window, cooldown, persistence; fully automated at threshold 3) against
  a greedy balancer on the same trace (the same engine with the cost, the window, the cooldown and
  the persistence switched off: it moves whenever a move lowers the current imbalance) and against
  no balancing. Reported: moves, VMs moved back to a host they left within 30 minutes (thrashing),
  predicted migration seconds and downtime, and the imbalance held (the weighted standard deviation of
  normalised host load, measured on each minute's current load).

Writes ``drs-latest.json`` and ``drs-latest.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from vmshift.model.host import CpuModelInfo  # noqa: E402
from vmshift.placement.recommendation import DrsMemory  # noqa: E402
from vmshift.placement.recommender import recommend  # noqa: E402
from vmshift.placement.settings import DrsSettings  # noqa: E402
from vmshift.placement.simulate import applied  # noqa: E402
from vmshift.placement.snapshot import (  # noqa: E402
    ClusterSnapshot,
    DrsAutomation,
    HostState,
    LoadSample,
    Rule,
    RuleKind,
    RuleStrength,
    VmState,
)
from vmshift.placement.state import ClusterState  # noqa: E402

WINDOW = 15  # 5 minutes of 20 s samples
STEP_S = 20.0
PASS_S = 60.0
GROUPS = 4  # application groups; each peaks at its own hour
SHARED = frozenset({"shared-1"})
NETS = frozenset({"VM Network"})
MODELS = (CpuModelInfo(name="qemu64"),)
MACHINES = frozenset({"pc-q35-10.0"})


@dataclass(frozen=True, slots=True)
class SimVm:
    """The part of a simulated VM that drives its load: base use, group, noise."""

    name: str
    base_cpu: float
    base_mem_mib: float
    group: int


def load_at(v: SimVm, t_s: float, rng: random.Random) -> LoadSample:
    phase = 2 * math.pi * (t_s / 86400 + v.group / GROUPS)
    daily = 0.55 + 0.45 * math.sin(phase)
    noise = max(0.0, rng.gauss(1.0, 0.15))
    return LoadSample(v.base_cpu * daily * noise, v.base_mem_mib * (0.8 + 0.2 * daily))


def build(n_hosts: int, n_vms: int, n_rules: int, seed: int, skew: float = 0.6) -> tuple[ClusterSnapshot,
                                                                                         list[SimVm]]:
    """Hosts of 64 cores and 768 GiB; VMs of 1-8 vCPUs and 2-16 GiB, placed with a skew (the first
    hosts take more of the busy groups), so the cluster starts out of balance. Rules hold at the
    start: anti-affinity pairs sit on different hosts, VM-host rules include the VM's host."""
    rng = random.Random(seed)
    hosts = tuple(HostState(f"host-{i:02d}", 64, 768 * 1024, cpu_models=MODELS, machine_types=MACHINES,
                            datastores=SHARED, networks=NETS) for i in range(n_hosts))
    sims: list[SimVm] = []
    vms: list[VmState] = []
    for i in range(n_vms):
        cpus = rng.choice([1, 2, 2, 4, 4, 8])
        mem = rng.choice([2048, 4096, 4096, 8192, 16384])
        group = rng.randrange(GROUPS)
        # skewed placement: group 0 VMs crowd onto the first third of the hosts
        if group == 0 and rng.random() < skew:
            h = rng.randrange(max(1, n_hosts // 3))
        else:
            h = rng.randrange(n_hosts)
        sim = SimVm(f"vm-{i:05d}", cpus * rng.uniform(0.1, 0.6), mem * rng.uniform(0.3, 0.9), group)
        sims.append(sim)
        history = tuple(load_at(sim, -STEP_S * (WINDOW - k), rng) for k in range(WINDOW))
        vms.append(VmState(sim.name, hosts[h].name, cpus, mem, datastores=SHARED, networks=NETS,
                           history=history, dirty_rate_bps=rng.choice([1e6, 2e7, 1e8]) * cpus / 4))
    rules: list[Rule] = []
    where = {v.name: v.host for v in vms}
    names = [v.name for v in vms]
    kinds = [(RuleKind.VM_ANTI_AFFINITY, RuleStrength.MUST), (RuleKind.VM_ANTI_AFFINITY, RuleStrength.SHOULD),
             (RuleKind.VM_AFFINITY, RuleStrength.SHOULD), (RuleKind.VM_HOST_AFFINITY, RuleStrength.MUST),
             (RuleKind.VM_HOST_ANTI_AFFINITY, RuleStrength.MUST)]
    host_names = [h.name for h in hosts]
    while len(rules) < n_rules:
        kind, strength = kinds[len(rules) % len(kinds)]
        a, b = rng.sample(names, 2)
        if kind is RuleKind.VM_ANTI_AFFINITY and where[a] == where[b]:
            continue
        if kind is RuleKind.VM_AFFINITY:
            members = frozenset({a, b})
        elif kind is RuleKind.VM_HOST_AFFINITY:
            allowed = {where[a], *rng.sample(host_names, min(len(host_names), n_hosts // 4 + 1))}
            rules.append(Rule(f"rule-{len(rules)}", kind, strength, frozenset({a}), frozenset(allowed)))
            continue
        elif kind is RuleKind.VM_HOST_ANTI_AFFINITY:
            banned = frozenset(h for h in rng.sample(host_names, min(len(host_names), 2)) if h != where[a])
            rules.append(Rule(f"rule-{len(rules)}", kind, strength, frozenset({a}), banned))
            continue
        else:
            members = frozenset({a, b})
        rules.append(Rule(f"rule-{len(rules)}", kind, strength, members))
    return ClusterSnapshot(hosts, tuple(vms), tuple(rules), now_s=0.0, history_step_s=STEP_S), sims


def working(n_hosts: int) -> DrsMemory:
    """A memory in which every host has been out of balance long enough to act on."""
    return DrsMemory({f"host-{i:02d}": 99 for i in range(n_hosts)})


def time_pass(n_hosts: int, n_vms: int, n_rules: int, repeat: int, seed: int) -> dict[str, Any]:
    snap, _ = build(n_hosts, n_vms, n_rules, seed)
    settings = DrsSettings(automation=DrsAutomation.FULLY)
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = recommend(snap, settings, working(n_hosts))
        times.append(time.perf_counter() - t0)
    assert result is not None
    return {"hosts": n_hosts, "vms": n_vms, "rules": n_rules, "best_s": round(min(times), 3),
            "median_s": round(statistics.median(times), 3), "moves": len(result.recommendations),
            "imbalance_before": round(result.imbalance_before, 4),
            "imbalance_after": round(result.imbalance_after, 4)}


def current_imbalance(snap: ClusterSnapshot, settings: DrsSettings) -> float:
    now = replace(snap, vms=tuple(replace(v, history=v.history[-1:]) for v in snap.vms))
    return ClusterState(now, settings).imbalance()


GREEDY = DrsSettings(automation=DrsAutomation.FULLY, threshold=5, cost_per_migration_s=0.0,
                     cost_per_downtime_s=0.0, cooldown_s=0.0, persist_passes=1)


def day(n_hosts: int, n_vms: int, n_rules: int, seed: int, hours: float) -> dict[str, Any]:
    base, sims = build(n_hosts, n_vms, n_rules, seed)
    runs: dict[str, dict[str, Any]] = {}
    series: dict[str, list[float]] = {}
    for name, settings in (("vmshift", DrsSettings(automation=DrsAutomation.FULLY)), ("greedy", GREEDY),
                           ("none", None)):
        rng = random.Random(seed + 1)  # the same trace for each balancer
        snap, memory = base, DrsMemory()
        moves = back = 0
        seconds = downtime_ms = 0.0
        left: dict[tuple[str, str], float] = {}  # (vm, host it left) -> when
        imbalance: list[float] = []
        measure = settings or DrsSettings()
        pass_times: list[float] = []
        for k in range(int(hours * 3600 / PASS_S)):
            t = k * PASS_S
            new = {s.name: [load_at(s, t + STEP_S * j, rng) for j in range(3)] for s in sims}
            snap = replace(snap, now_s=t, vms=tuple(replace(v, history=(*v.history[3:], *new[v.name]))
                                                    for v in snap.vms))
            if settings is not None:
                view = snap if settings is not GREEDY else replace(
                    snap, vms=tuple(replace(v, history=v.history[-1:]) for v in snap.vms))
                t0 = time.perf_counter()
                p = recommend(view, settings, memory)
                pass_times.append(time.perf_counter() - t0)
                memory = p.memory
                for r in p.recommendations:
                    moves += 1
                    seconds += r.predicted_s
                    downtime_ms += r.downtime_ms
                    if t - left.get((r.vm, r.target), -1e9) <= 1800:
                        back += 1
                    left[(r.vm, r.source)] = t
                snap = applied(snap, p.recommendations)
            imbalance.append(current_imbalance(snap, measure))
        series[name] = imbalance
        runs[name] = {"moves": moves, "moved_back_within_30_min": back,
                      "migration_seconds": round(seconds, 1), "downtime_ms_total": round(downtime_ms),
                      "imbalance_mean": round(statistics.fmean(imbalance), 4),
                      "imbalance_p95": round(sorted(imbalance)[int(0.95 * (len(imbalance) - 1))], 4),
                      "pass_median_s": round(statistics.median(pass_times), 4) if pass_times else None}
    return {"hosts": n_hosts, "vms": n_vms, "rules": n_rules, "hours": hours, "pass_interval_s": PASS_S,
            "balancers": runs, "_series": series}


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip()


def plot(growth: list[dict[str, Any]], day_result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    hosts = [g["hosts"] for g in growth]
    a.plot(hosts, [g["median_s"] for g in growth], "o-", label="median of runs")
    a.axhline(1.0, color="grey", lw=0.8, ls="--", label="target at 96 hosts")
    a.set_xlabel("hosts (~104 VMs each, rules in proportion)")
    a.set_ylabel("one DRS pass, s")
    a.legend()
    for name, style in (("none", ":"), ("greedy", "--"), ("vmshift", "-")):
        ys = day_result["_series"][name]
        runs = day_result["balancers"][name]
        label = f"{name} ({runs['moves']} moves)" if name != "none" else "no balancing"
        b.plot([k * PASS_S / 3600 for k in range(len(ys))], ys, style, lw=1, label=label)
    b.set_xlabel("hour of the simulated day")
    b.set_ylabel("imbalance (weighted sd of host load)")
    b.legend()
    fig.suptitle(f"vmshift DRS: pass time and a day of shifting load ({git_commit()})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--hosts", type=int, default=96)
    p.add_argument("--vms", type=int, default=10_000)
    p.add_argument("--rules", type=int, default=500)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--growth", default="8,16,32,48,64,96", help="host counts, comma separated")
    p.add_argument("--day-hosts", type=int, default=16)
    p.add_argument("--day-vms-per-host", type=int, default=40)
    p.add_argument("--hours", type=float, default=24.0)
    p.add_argument("--seed", type=int, default=11)
    args = p.parse_args(argv)
    per_host = args.vms / args.hosts
    print(f"one pass: {args.hosts} hosts x {args.vms} VMs, {args.rules} rules", flush=True)
    one = time_pass(args.hosts, args.vms, args.rules, args.repeat, args.seed)
    print(json.dumps(one), flush=True)
    growth = []
    for n in (int(x) for x in args.growth.split(",")):
        g = one if n == args.hosts else time_pass(n, round(n * per_host), round(args.rules * n / args.hosts),
                                                   args.repeat, args.seed)
        growth.append(g)
        print(json.dumps(g), flush=True)
    day_vms = args.day_hosts * args.day_vms_per_host
    print(f"day: {args.day_hosts} hosts x {day_vms} VMs, {args.hours} h", flush=True)
    d = day(args.day_hosts, day_vms, args.rules * args.day_hosts // args.hosts,
            args.seed, args.hours)
    print(json.dumps(d["balancers"], indent=1), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(growth, d, args.out / "drs-latest.png")
    machine = {"cpus": os.cpu_count(), "python": platform.python_version()}
    result = {"commit": git_commit(), "machine": machine, "pass": one, "target_s": 1.0, "growth": growth,
              "day": {k: v for k, v in d.items() if not k.startswith("_")}}
    (args.out / "drs-latest.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'drs-latest.json'} and drs-latest.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
