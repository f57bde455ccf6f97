"""Benchmark: 8 concurrent live migrations out of one lab host, against the same 8 one by one (issue 12).

    sudo .venv/bin/python bench/concurrent_migrations.py [--count 8] [--memory 128]
        [--json bench/results/concurrent-latest.json]        (also: make bench-concurrent)

One lab of two hosts comes up (and is always torn down, also on Ctrl-C). --count small lab guests
boot on host-1, each with the memory tester and the disk log running. Both hosts' limit of concurrent
migrations is raised to --count (`vmshift host migration-settings host-N --limit 8`; the default, 4,
would queue half of them). Then:

1. **concurrent**: every guest gets a long-lived TCP echo connection from the client namespace, all
   --count migrations to host-2 start at once (one POST each, no waiting in between), and the run
   waits for every task.
2. **sequential**: the same guests move back to host-1 one by one, each with its own TCP connection
   (the lab's hosts are identical, so host-2 -> host-1 is the same work as host-1 -> host-2).

After each round every guest is verified: the inventory names the target, exactly one QEMU of the VM
runs and in the target's namespace, the TCP connection survived, the memory tester finished two more
passes with 0 mismatches and the disk log advanced. The JSON holds, per round, the wall time from the
first POST to the last task's end, and per migration QEMU's total time, its downtime and when it ended
relative to the round's start; plus the machine's load averages before and after (the machine is
shared: the load says how much of it the benchmark had).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import psutil

from vmshift.client import VmshiftClient
from vmshift.errors import VmshiftError
from vmshift.lab.probe import BackgroundProbe, tcp_hold_process
from vmshift.model.enums import TaskState
from vmshift.model.migration import MigrationStatus

Json = dict[str, Any]
REPO = Path(__file__).resolve().parent.parent
VMSHIFT = Path(sys.executable).parent / "vmshift"
KERNEL_ARGS = "vmshift.memtest=16,4 vmshift.disklog=1"  # a 4 s memtest pass: verification stays quick
MEMTEST_PASSES_AFTER = 2
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


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
        raise VmshiftError(f"{what} failed: {data.get('error', data)}")
    return data


def load() -> Json:
    one, five, fifteen = os.getloadavg()
    return {"load_1m": round(one, 2), "load_5m": round(five, 2), "load_15m": round(fifteen, 2),
            "cpus": os.cpu_count(), "qemu_processes_on_machine": sum(
                1 for p in psutil.process_iter(["name"]) if "qemu-system" in (p.info["name"] or ""))}


# ---------------------------------------------------------------- guests


def guest_check(ns: str, ip: str, wait_s: float = 60.0) -> Json:
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


def wait_memtest_passes(ns: str, ip: str, passes: int, timeout_s: float = 300.0) -> Json:
    deadline = time.monotonic() + timeout_s
    while True:
        answer = guest_check(ns, ip)
        if answer.get("echo") and (answer.get("memtest") or {}).get("passes", 0) >= passes:
            return answer
        if time.monotonic() > deadline:
            raise VmshiftError(f"memtest at {ip} did not reach {passes} passes within {timeout_s:.0f} s: "
                               f"{answer}")
        time.sleep(1.0)


def qemu_namespaces(uuid: str) -> list[str]:
    """The network namespace of every QEMU of the VM (its host's: `vms-LAB-host-N`)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if cmd and "qemu-system" in cmd[0] and any(uuid in a for a in cmd):
            ns = _run(["ip", "netns", "identify", str(p.info["pid"])], 10).stdout.strip()
            found.append(ns)
    return found


@dataclass
class Guest:
    name: str
    uuid: str
    ip: str


def create_guests(api: VmshiftClient, ns: str, count: int, memory_mib: int) -> list[Guest]:
    tasks = [api.create_vm({
        "name": f"bcm-{i}", "host": "host-1", "cpus": 1, "memory_mib": memory_mib, "datastore": "shared-1",
        "networks": ["VM Network"], "disks_mib": [64], "image": "lab-guest", "start": True,
        "kernel_args": KERNEL_ARGS,
    }) for i in range(1, count + 1)]
    for task in tasks:
        final = api.wait_task(task["id"], timeout=600)
        if final["state"] != TaskState.SUCCESS:
            raise VmshiftError(f"Creating a guest failed: {final.get('error')}")
    guests = []
    for i in range(1, count + 1):
        vm = api.get_vm(f"bcm-{i}")
        guests.append(Guest(vm["name"], vm["uuid"], str(vm["ip"])))
    for g in guests:
        wait_memtest_passes(ns, g.ip, 1)
    return guests


# ---------------------------------------------------------------- one round


@dataclass
class Move:
    vm: str
    source: str
    target: str
    migration_id: int | None = None
    status: str = "not started"
    error: str | None = None
    total_ms: int | None = None
    downtime_ms: int | None = None
    ended_after_ms: float | None = None  # from the round's first POST to the migration's finished_at
    started_after_ms: float | None = None  # ... to its started_at (after the checks; queued ones later)
    tcp: Json = field(default_factory=dict)
    qemu_namespaces: list[str] = field(default_factory=list)
    memtest_mismatches: int | None = None
    disklog_before: int | None = None
    disklog_after: int | None = None
    verified: bool = False


class RoundMode(StrEnum):
    CONCURRENT = "concurrent"  # every migration started at once
    SEQUENTIAL = "sequential"  # one after the other


@dataclass
class Round:
    mode: RoundMode
    source: str
    target: str
    wall_ms: float | None = None
    moves: list[Move] = field(default_factory=list)
    load_before: Json = field(default_factory=dict)
    load_after: Json = field(default_factory=dict)


def _start(api: VmshiftClient, move: Move) -> int:
    task = api.migrate_vm(move.vm, move.target)
    move.migration_id = int(task["migration_id"])
    return int(task["id"])


def _since(t_start: float, stamp: str | None) -> float | None:
    """ms from t_start (epoch seconds, this machine's clock: the lab's server runs on it too)."""
    if not stamp:
        return None
    at = datetime.fromisoformat(stamp)
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    return round((at.timestamp() - t_start) * 1000, 1)


def _finish(api: VmshiftClient, move: Move, task_id: int, t_start: float) -> None:
    """Wait for the move's task, then take its times from the migration record (the tasks are waited
    for one after the other: the record says when each really ended)."""
    api.wait_task(task_id, timeout=900)
    assert move.migration_id is not None
    m = api.get_migration(move.migration_id)
    move.ended_after_ms = _since(t_start, m.get("finished_at"))
    move.started_after_ms = _since(t_start, m.get("started_at"))
    move.status = str(m["status"])
    move.error = (m.get("error") or {}).get("message")
    move.total_ms, move.downtime_ms = m["metrics"].get("total_ms"), m["metrics"].get("downtime_ms")


def verify(api: VmshiftClient, lab: Json, guest: Guest, move: Move) -> None:
    """The guest after its move: where the inventory says, one QEMU, memory and disk intact."""
    ns = str(lab["client_namespace"])
    move.qemu_namespaces = qemu_namespaces(guest.uuid)
    where_ok = (api.get_vm(guest.name)["host"] == move.target
                and move.qemu_namespaces == [f"vms-{lab['name']}-{move.target}"])
    arrived = guest_check(ns, guest.ip)
    after = wait_memtest_passes(ns, guest.ip, int((arrived.get("memtest") or {}).get("passes", 0))
                                + MEMTEST_PASSES_AFTER)
    move.memtest_mismatches = (after.get("memtest") or {}).get("mismatches")
    move.disklog_after = (after.get("disklog") or {}).get("durable_seq")
    move.verified = (where_ok and move.status == MigrationStatus.COMPLETED and bool(move.tcp.get("survived"))
                     and move.memtest_mismatches == 0 and move.disklog_before is not None
                     and move.disklog_after is not None and move.disklog_after > move.disklog_before)


def run_round(api: VmshiftClient, lab: Json, guests: list[Guest], mode: RoundMode, source: str,
              target: str) -> Round:
    ns = str(lab["client_namespace"])
    rnd = Round(mode, source, target, load_before=load())
    moves = [Move(g.name, source, target) for g in guests]
    rnd.moves = moves
    for g, move in zip(guests, moves, strict=True):
        move.disklog_before = (guest_check(ns, g.ip).get("disklog") or {}).get("durable_seq")
    holds: list[BackgroundProbe] = []
    try:
        if mode == RoundMode.CONCURRENT:
            holds = [tcp_hold_process(ns, g.ip) for g in guests]
            time.sleep(1.0)  # the holds connect (a hold that never connected reports survived: false)
            t_start = time.time()
            task_ids = [_start(api, move) for move in moves]
            for move, task_id in zip(moves, task_ids, strict=True):
                _finish(api, move, task_id, t_start)
            rnd.wall_ms = round(max(m.ended_after_ms or 0.0 for m in moves), 1)
            for move, hold in zip(moves, holds, strict=True):
                move.tcp = hold.stop()
            holds = []
        else:
            total = 0.0
            for g, move in zip(guests, moves, strict=True):
                hold = tcp_hold_process(ns, g.ip)
                holds = [hold]
                time.sleep(1.0)
                t_start = time.time()
                _finish(api, move, _start(api, move), t_start)
                total += move.ended_after_ms or 0.0
                move.tcp = hold.stop()
                holds = []
            rnd.wall_ms = round(total, 1)  # the migrations' own times, without the holds' set-up
    finally:
        for hold in holds:
            hold.stop()
    rnd.load_after = load()
    for g, move in zip(guests, moves, strict=True):
        verify(api, lab, g, move)
        say(f"{mode} {move.vm}: {move.status}, total {move.total_ms} ms, downtime {move.downtime_ms} ms, "
            f"ended at +{move.ended_after_ms} ms, verified {move.verified}")
    return rnd


# ---------------------------------------------------------------- report


def summary(rounds: list[Round]) -> Json:
    by_mode = {r.mode: r for r in rounds}
    out: Json = {}
    for r in rounds:
        done = [m for m in r.moves if m.status == MigrationStatus.COMPLETED]
        totals = [m.total_ms for m in done if m.total_ms is not None]
        downs = [m.downtime_ms for m in done if m.downtime_ms is not None]
        out[r.mode] = {
            "wall_s": None if r.wall_ms is None else round(r.wall_ms / 1000, 2),
            "completed": len(done), "verified": sum(m.verified for m in r.moves),
            "total_ms_max": max(totals, default=None), "total_ms_mean": round(sum(totals) / len(totals))
            if totals else None,
            "downtime_ms_max": max(downs, default=None),
            "downtime_ms_mean": round(sum(downs) / len(downs)) if downs else None,
        }
    conc, seq = by_mode.get(RoundMode.CONCURRENT), by_mode.get(RoundMode.SEQUENTIAL)
    if conc and seq and conc.wall_ms and seq.wall_ms:
        out["concurrent_over_sequential"] = round(conc.wall_ms / seq.wall_ms, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--memory", type=int, default=128, help="MiB per guest")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "concurrent-latest.json")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("error: the benchmark brings up a lab: run it as root.", file=sys.stderr)
        return 2
    name = f"bcm{os.urandom(3).hex()}"
    result: Json = {"benchmark": "concurrent_migrations", "started_at": datetime.now(UTC).isoformat(),
                    "count": args.count, "memory_mib": args.memory, "kernel_args": KERNEL_ARGS,
                    "lab": name, "load_at_start": load()}
    rounds: list[Round] = []
    say(f"lab {name} up")
    try:
        up = _json_out(_run([str(VMSHIFT), "lab", "up", "--name", name, "--hosts", "2", "--json"], 900),
                       "lab up")
        env = _json_out(_run([str(VMSHIFT), "lab", "env", "--name", name, "--json"], 60), "lab env")
        lab = {"name": name, "client_namespace": str(up["client_namespace"])}
        with VmshiftClient(str(env["VMSHIFT_SERVER"]), str(env["VMSHIFT_TOKEN"]),
                           ca_file=env.get("VMSHIFT_CA_FILE"), timeout=60) as api:
            for host in ("host-1", "host-2"):
                api.set_host_migration_settings(host, migration_limit=args.count)
            say(f"creating {args.count} guests of {args.memory} MiB on host-1")
            guests = create_guests(api, str(lab["client_namespace"]), args.count, args.memory)
            say(f"{args.count} migrations host-1 -> host-2 at once")
            rounds.append(run_round(api, lab, guests, RoundMode.CONCURRENT, "host-1", "host-2"))
            say(f"{args.count} migrations host-2 -> host-1 one by one")
            rounds.append(run_round(api, lab, guests, RoundMode.SEQUENTIAL, "host-2", "host-1"))
    except KeyboardInterrupt:
        result["error"] = "interrupted"
    except Exception as e:  # recorded in the result; the lab still comes down
        result["error"] = f"{type(e).__name__}: {e}"
        say(f"stopped: {result['error']}")
    finally:
        say(f"lab {name} down")
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            down = _run([str(VMSHIFT), "lab", "down", "--name", name, "--json"], 600, new_session=True)
        finally:
            signal.signal(signal.SIGINT, previous)
        result["teardown_exit"] = down.returncode
    result["rounds"] = [asdict(r) for r in rounds]
    result["summary"] = summary(rounds)
    result["finished_at"] = datetime.now(UTC).isoformat()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    say(f"wrote {args.json}: {json.dumps(result['summary'])}")
    ok = "error" not in result and all(m.verified for r in rounds for m in r.moves)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
