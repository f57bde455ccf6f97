"""Experiment: where the client's blackout goes after the target QEMU's `cont` (issue 6, item 3).

    sudo .venv/bin/python bench/blackout_probe.py [--server-legs 6] [--warm 6] [--legs 3]
        [--variants prod,backlog60,autostart,late-quit,nice,jit,perf] [--json PATH] [--no-sched]
    .venv/bin/python bench/blackout_probe.py report RESULT.json     # the table again

One lab of two hosts comes up (this venv's `vmshift lab up`) and is always torn down (`--lab NAME`
uses a lab brought up by hand and leaves it up). The demo guest of bench/switchover.py (256 MiB,
memtest 64 MiB at 50 MiB/s, disklog) runs on host-1. While the lab's 1 ms UDP probe
(vmshift.lab.probe udp) runs from the client namespace, a sniffer in the switch namespace stamps
(SO_TIMESTAMPNS) every probe datagram, reply, RARP and ARP on the switch ports of the client and
both hosts, and `perf record -a` traces every context switch of the machine.

1. server legs: `--server-legs` migrations through the server, as bench/switchover.py makes them,
   with the migration's timeline beside the sniffer's marks.
2. The server and both agents are stopped (SIGTERM keeps the QEMU running); from here this script
   talks QMP to the QEMUs itself.
3. warm: `--warm` times `stop`, a 40 ms pause, `cont` of the running QEMU, whose translation cache
   is warm: what the guest needs after `cont` when nothing is cold.
4. cold legs: for each variant, `--legs` migrations between host-1 and host-2 to a target QEMU this
   script starts (the source's command line with its own QMP socket, pid file, serial log, tap and
   QEMU's vmstate_downtime_* trace events, plus `-S -incoming defer`), set up like the target agent
   does (events, late-block-activate, announce-initial 1) unless the variant says otherwise; the
   source like the source agent does (unlimited bandwidth, 300 ms downtime limit). After each leg
   memtest must finish two more passes with 0 mismatches and disklog must have advanced.

Variants (bench/README.md says what each one isolates):
    prod          -S, late-block-activate, `cont` 10 ms after the source's completed event (about
                  the agents' confirm latency), announce-self after it, source quit at once
    backlog60     as prod, but a RARP from the target host's uplink right after the stream loaded
                  and `cont` 60 ms after completed: ~55 requests wait in the target's tap
    autostart     no -S: QEMU runs the guest by itself when the stream loaded (the code before issue 6)
    late-quit     as prod, the source QEMU quit 1 s after `cont` instead of at once
    nice          as prod, every thread of the target QEMU reniced to -10 just before `cont`
    jit           as prod, TCG's translated-block count (x-query-jit) sampled after `cont`
    perf          as prod, `perf record` (cpu-clock, DWARF call chains) of the target QEMU: how much
                  of its vCPU thread's time after `cont` goes to translating guest code
    postcopy-cap  as prod, postcopy-ram set on the target (as the target agent does); not by default

Internal subcommands: `sniff --out FILE IFACE...` (switch namespace), `inject IFACE MAC`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import itertools
import json
import os
import re
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

Json = dict[str, Any]
REPO = Path(__file__).resolve().parent.parent
UDP_PORT = 7001
ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = 35
PACKET_OUTGOING = 4
TRACE_EVENTS = ("vmstate_downtime_checkpoint", "vmstate_downtime_load", "vmstate_downtime_save")
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


# ================================================================ sniffer (switch namespace)


def _classify(frame: bytes) -> tuple[str, Any]:
    """(kind, detail) of an Ethernet frame: probe request/reply with its sequence number, RARP, ARP..."""
    if len(frame) < 14:
        return "short", None
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == 0x8035:
        return "rarp", None
    if ethertype == 0x0806 and len(frame) >= 42:
        op = struct.unpack_from("!H", frame, 20)[0]
        return "arp", f"{op}:{socket.inet_ntoa(frame[28:32])}>{socket.inet_ntoa(frame[38:42])}"
    if ethertype == 0x86DD:
        return "ip6", None
    if ethertype != 0x0800 or len(frame) < 34:
        return f"eth{ethertype:04x}", None
    ihl = (frame[14] & 0x0F) * 4
    proto = frame[23]
    l4 = 14 + ihl
    if proto == 17 and len(frame) >= l4 + 8 + 8:
        sport, dport = struct.unpack_from("!HH", frame, l4)
        seq = struct.unpack_from("!Q", frame, l4 + 8)[0]
        if dport == UDP_PORT:
            return "req", seq
        if sport == UDP_PORT:
            return "rep", seq
        return "udp", None
    if proto == 6:
        return "tcp", None
    return f"ip{proto}", None


def sniff_main(ifaces: list[str], out: Path) -> int:
    """Record frames on `ifaces` until stdin closes, then write them to `out` as JSON."""
    socks: dict[int, tuple[socket.socket, str]] = {}
    for name in ifaces:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((name, 0))
        s.setblocking(False)
        socks[s.fileno()] = (s, name)
    records: list[list[Any]] = []
    print("ready", flush=True)
    stdin = sys.stdin.fileno()
    running = True
    while running:
        ready, _, _ = select.select([*socks, stdin], [], [], 1.0)
        for fd in ready:
            if fd == stdin:
                if not os.read(stdin, 4096):
                    running = False
                continue
            s, name = socks[fd]
            while True:
                try:
                    data, anc, _flags, addr = s.recvmsg(160, socket.CMSG_SPACE(16))
                except BlockingIOError:
                    break
                t = time.time()
                for level, ctype, cdata in anc:
                    if level == socket.SOL_SOCKET and ctype == SO_TIMESTAMPNS and len(cdata) >= 16:
                        sec, nsec = struct.unpack_from("qq", cdata)
                        t = sec + nsec / 1e9
                kind, detail = _classify(data)
                if kind in ("tcp", "udp"):
                    continue
                records.append([round(t, 6), name, addr[2], kind, detail, data[6:12].hex(":")])
    out.write_text(json.dumps(records))
    return 0


def rarp_frame(mac: str) -> bytes:
    hw = bytes.fromhex(mac.replace(":", ""))
    return (b"\xff" * 6 + hw + struct.pack("!HHHBBH", 0x8035, 1, 0x0800, 6, 4, 3)
            + hw + b"\0" * 4 + hw + b"\0" * 4).ljust(60, b"\0")


def inject_main(iface: str, mac: str) -> int:
    """Send a RARP from `mac` out of `iface` for every line on stdin; print the time of each."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    frame = rarp_frame(mac)
    print("ready", flush=True)
    for _ in sys.stdin:
        s.send(frame)
        print(time.time(), flush=True)
    return 0


class SchedTrace:
    """`perf record` of every context switch and wakeup on the machine.

    perf 6.1 refuses CLOCK_REALTIME for tracepoints here, so the stamps are CLOCK_MONOTONIC; the
    offset to the wall clock is written beside the data (DATA.offset).
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        offset = time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)
        out.with_suffix(".offset").write_text(repr(offset))
        self.proc = subprocess.Popen(
            ["perf", "record", "-q", "-a", "-k", "CLOCK_MONOTONIC", "-e", "sched:sched_switch",
             "-e", "sched:sched_wakeup", "-o", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(60)


_SWITCH = re.compile(r"prev_comm=(.*?) prev_pid=(\d+) prev_prio=\d+ prev_state=(\S+) ==> "
                     r"next_comm=(.*?) next_pid=(\d+)")
_WAKEUP = re.compile(r"comm=(.*?) pid=(\d+) prio=\d+")


def thread_labels(pids: dict[int, str]) -> dict[int, str]:
    """tid -> "label" for every thread of the given processes (pid -> label)."""
    labels: dict[int, str] = {}
    for pid, label in pids.items():
        with contextlib.suppress(OSError):
            tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
            for i, tid in enumerate(sorted(tids)):
                # QEMU's threads are not named (no debug-threads): main thread first, then by creation
                labels[tid] = label if tid == pid else f"{label} thread {i}"
    return labels


def cpu_budget(data: Path, windows: dict[str, tuple[float, float]], labels: dict[int, str],
               watch: tuple[str, ...] = ("target qemu", "source qemu")) -> Json:
    """Per window: ms on CPU by thread label; for the watched threads also ms runnable but not running."""
    proc = subprocess.run(["perf", "script", "-i", str(data), "-F", "cpu,time,event,trace"],
                          capture_output=True, text=True, timeout=600, check=False)
    offset = float(data.with_suffix(".offset").read_text())
    line_re = re.compile(r"^\s*\[(\d+)\]\s+(\d+\.\d+):\s+sched:(sched_\w+):\s+(.*)$")
    running: dict[int, tuple[int, str, float]] = {}  # cpu -> (tid, comm, since)
    runnable_since: dict[int, float] = {}
    slices: list[tuple[int, str, float, float]] = []  # tid, comm, start, end
    waits: list[tuple[int, float, float]] = []
    for line in proc.stdout.splitlines():
        m = line_re.match(line)
        if not m:
            continue
        cpu, t, ev, rest = int(m.group(1)), float(m.group(2)) + offset, m.group(3), m.group(4)
        if ev == "sched_switch":
            sm = _SWITCH.search(rest)
            if not sm:
                continue
            prev, prev_state, nxt, next_comm = int(sm.group(2)), sm.group(3), int(sm.group(5)), sm.group(4)
            if cpu in running:
                tid, comm, since = running[cpu]
                slices.append((tid, comm, since, t))
            if prev_state.startswith("R"):  # preempted: still wants the CPU
                runnable_since[prev] = t
            if nxt in runnable_since:
                waits.append((nxt, runnable_since.pop(nxt), t))
            running[cpu] = (nxt, next_comm, t)
        elif ev == "sched_wakeup":
            wm = _WAKEUP.search(rest)
            if wm:
                runnable_since.setdefault(int(wm.group(2)), t)
    labels = dict(labels)

    def busiest(prefix: str, window: str) -> int | None:
        if window not in windows:
            return None
        a, b = windows[window]
        use: dict[int, float] = {}
        for tid, _, start, end in slices:
            if labels.get(tid, "").startswith(prefix) and min(end, b) > max(start, a):
                use[tid] = use.get(tid, 0.0) + min(end, b) - max(start, a)
        return max(use, key=lambda t: use[t]) if use else None

    # QEMU's threads have no names here: the busiest target thread after `cont` is its vCPU, the
    # busiest source thread while the source is stopped is its migration thread
    for prefix, window, name in (("target qemu", "target_cont..first_reply", "target qemu vCPU"),
                                 ("source qemu", "source_stopped..last_byte_sent", "source qemu migration")):
        found = busiest(prefix, window)
        if found is not None:
            labels[found] = name
    out: Json = {}
    for name, (a, b) in windows.items():
        on_cpu: dict[str, float] = {}
        for tid, comm, start, end in slices:
            overlap = min(end, b) - max(start, a)
            if overlap > 0 and tid != 0:
                label = labels.get(tid, f"other: {comm}")
                on_cpu[label] = on_cpu.get(label, 0.0) + overlap * 1000
        idle = sum(min(e, b) - max(st, a) for tid, _, st, e in slices if tid == 0 and min(e, b) > max(st, a))
        waited: dict[str, float] = {}
        for tid, st, e in waits:
            label = labels.get(tid, "")
            if label.startswith(watch) and min(e, b) > max(st, a):
                waited[label] = round(waited.get(label, 0.0) + (min(e, b) - max(st, a)) * 1000, 2)
        top = sorted(on_cpu.items(), key=lambda kv: -kv[1])
        out[name] = {"window_ms": round((b - a) * 1000, 2), "idle_ms (2 cpus)": round(idle * 1000, 2),
                     "on_cpu_ms": {k: round(v, 2) for k, v in top[:12]},
                     "runnable_not_running_ms": waited}
    return out


class Sniffer:
    """The sniffer subprocess in the switch namespace."""

    def __init__(self, switch_ns: str, ifaces: list[str], out: Path) -> None:
        self.out = out
        cmd = ["ip", "netns", "exec", switch_ns, sys.executable, str(Path(__file__).resolve()),
               "sniff", "--out", str(out), *ifaces]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            raise RuntimeError(f"the sniffer did not start (said {line!r})")

    def stop(self) -> list[list[Any]]:
        self.proc.communicate(input="", timeout=30)
        return list(json.loads(self.out.read_text()))


# ================================================================ lab helpers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import switchover as sw  # noqa: E402  (the lab, guest and server-leg helpers of the benchmark)

from vmshift.client import VmshiftClient  # noqa: E402
from vmshift.lab import processes  # noqa: E402
from vmshift.lab.layout import HOST_UPLINK as UPLINK  # noqa: E402
from vmshift.lab.layout import HOST_VM_BRIDGE, LabLayout, load_record  # noqa: E402
from vmshift.lab.probe import udp_probe_process  # noqa: E402
from vmshift.qemu import migration_qmp as mq  # noqa: E402
from vmshift.qemu.qmp import QmpSession  # noqa: E402


def ip_ns(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, text=True)


def load_stats() -> Json:
    qemus = subprocess.run(["pgrep", "-c", "-f", "qemu-system"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return {"loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0]),
            "qemu_processes": int(qemus or 0)}


@dataclass
class Vm:
    """Where the guest's QEMU runs now."""

    host: int
    pid: int
    argv: list[str]
    qmp_path: Path
    tap: str

    @property
    def mac(self) -> str:
        m = re.search(r'"mac":"([0-9a-fA-F:]+)"', " ".join(self.argv))
        return m.group(1).lower() if m else ""


def _opt(argv: list[str], flag: str, pred: str) -> int:
    for i, a in enumerate(argv[:-1]):
        if a == flag and pred in argv[i + 1]:
            return i + 1
    raise RuntimeError(f"no {flag} ... {pred} in the QEMU command line")


def vm_from_pid(pid: int, host: int) -> Vm:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")
    qmp = argv[_opt(argv, "-chardev", "id=qmp0")]
    tap = argv[_opt(argv, "-netdev", "tap,")]
    return Vm(host, pid, argv, Path(re.search(r"path=([^,]+)", qmp).group(1)),  # type: ignore[union-attr]
              re.search(r"ifname=([^,]+)", tap).group(1))  # type: ignore[union-attr]


def agent_vm(lay: LabLayout, host: int) -> Vm:
    """The guest's QEMU as the host's agent started it (its pid file in the agent's state dir)."""
    pidfile = next((lay.agent_state_dir(host) / "vms").glob("*/qemu.pid"))
    return vm_from_pid(int(pidfile.read_text().split()[0]), host)


def target_argv(src: list[str], work: Path, tap: str, incoming_paused: bool) -> list[str]:
    """The source's QEMU command line for a receiving QEMU with this script's socket, files and tap."""
    argv, skip = [], 0
    for a in src:
        if skip:
            skip -= 1
            continue
        if a == "-S":
            continue
        if a in ("-incoming", "-trace", "-D"):
            skip = 1
            continue
        argv.append(a)
    # QEMU's own switchover checkpoints and per-device save/load times, in its log (with -msg timestamp)
    for event in TRACE_EVENTS:
        argv += ["-trace", event]
    argv += ["-D", str(work / "trace.log")]
    argv[_opt(argv, "-chardev", "id=qmp0")] = f"socket,id=qmp0,path={work / 'qmp.sock'},server=on,wait=off"
    argv[_opt(argv, "-chardev", "id=serial0")] = f"file,id=serial0,path={work / 'serial.log'},append=on"
    argv[argv.index("-pidfile") + 1] = str(work / "qemu.pid")
    i = _opt(argv, "-netdev", "tap,")
    argv[i] = re.sub(r"ifname=[^,]+", f"ifname={tap}", argv[i])
    return [*argv, *(["-S"] if incoming_paused else []), "-incoming", "defer"]


def events(qmp: QmpSession, name: str, since: float, status: str | None = None) -> list[float]:
    return [e.time for e in qmp.events_named(name)
            if e.time >= since and (status is None or e.data.get("status") == status)]


def last_event(qmp: QmpSession, name: str, since: float, status: str | None = None) -> float | None:
    found = events(qmp, name, since, status)
    return found[-1] if found else None


def read_trace(argv: list[str]) -> list[tuple[float, str, str]]:
    """(time, event, detail) of QEMU's downtime trace events in the -D log of this command line."""
    if "-D" not in argv:
        return []
    log = Path(argv[argv.index("-D") + 1])
    if not log.exists():
        return []
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"^\d+@(\d+\.\d+):(vmstate_downtime_\w+) (.*)$", line)
        if m:
            out.append((float(m.group(1)), m.group(2), m.group(3)))
    return out


async def jit_tb_count(qmp: QmpSession) -> int | None:
    text = str((await qmp.execute("x-query-jit")).get("human-readable-text", ""))
    m = re.search(r"TB count\s+(\d+)", text)
    return int(m.group(1)) if m else None


# ================================================================ variants


@dataclass(frozen=True)
class Variant:
    name: str
    paused: bool = True  # -S (the agents' confirm phase) or QEMU's autostart
    late_block_activate: bool = True
    load_announce_rounds: int = 5  # RARPs QEMU sends when the stream loaded (0: none)
    confirm_delay_ms: float = 10.0  # `cont` this long after the source's completed event
    quit_source_after_s: float = 0.0
    jit_samples_ms: tuple[int, ...] = ()
    perf: bool = False
    target_postcopy_cap: bool = False  # the target agent sets postcopy-ram on every receiving QEMU
    fdb_early: bool = False  # teach the switch the target's port before `cont` (a RARP from its uplink)
    nice: int = 0  # renice every thread of the target QEMU to this just before `cont`


VARIANTS = {v.name: v for v in (
    Variant("prod"),
    Variant("postcopy-cap", target_postcopy_cap=True),
    Variant("backlog60", confirm_delay_ms=60.0, fdb_early=True),
    Variant("autostart", paused=False, late_block_activate=False),
    Variant("late-quit", quit_source_after_s=1.0),
    Variant("nice", nice=-10),
    Variant("jit", jit_samples_ms=(0, 10, 25, 50, 100, 200, 400, 1000)),
    Variant("perf", perf=True),
)}


# ================================================================ one cold leg, one warm series


@dataclass
class Lab:
    name: str
    lay: LabLayout
    ip: str
    work: Path
    mac: str = ""
    helper_pids: dict[int, str] = field(default_factory=dict)
    helper_labels: dict[int, str] = field(default_factory=dict)


async def cold_leg(lab: Lab, vm: Vm, v: Variant, n: int) -> tuple[Vm, Json]:
    """Migrate the guest to the other host with a QEMU we start; returns the new Vm and the marks."""
    lay, dst_host = lab.lay, 2 if vm.host == 1 else 1
    ns = lay.host_ns(dst_host)
    work = lab.work / f"leg{n}"
    work.mkdir(parents=True)
    tap = f"bxt{n}"
    ip_ns(ns, "tuntap", "add", "dev", tap, "mode", "tap")
    ip_ns(ns, "link", "set", "dev", tap, "master", HOST_VM_BRIDGE)
    ip_ns(ns, "link", "set", "dev", tap, "up")
    argv = target_argv(vm.argv, work, tap, v.paused)
    log = (work / "qemu.log").open("w")
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    marks: Json = {"variant": v.name, "from": vm.host, "to": dst_host, "load": load_stats()}
    dst = await QmpSession.connect(work / "qmp.sock", timeout_s=20, name="bx-dst")
    src = await QmpSession.connect(vm.qmp_path, timeout_s=10, name="bx-src")
    perf: subprocess.Popen[bytes] | None = None
    injector: subprocess.Popen[str] | None = None
    if v.fdb_early:
        injector = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(Path(__file__).resolve()), "inject", UPLINK,
             vm.mac],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert injector.stdout is not None
        injector.stdout.readline()
    try:
        caps = await mq.query_capabilities(dst)
        await mq.set_capabilities(dst, {"events": True, "postcopy-ram": v.target_postcopy_cap, **(
            {"late-block-activate": v.late_block_activate} if "late-block-activate" in caps else {})})
        await mq.set_parameters(dst, {"announce-initial": 1, "announce-rounds": v.load_announce_rounds})
        await mq.migrate_incoming(dst, f"tcp:{lay.host_mig_address(dst_host)}:0")
        uri = f"tcp:{lay.host_mig_address(dst_host)}:{await mq.listening_port(dst)}"
        await mq.set_capabilities(src, {"events": True, "auto-converge": True, "multifd": False,
                                        "postcopy-ram": False, "late-block-activate": False})
        await mq.set_parameters(src, {"max-bandwidth": mq.UNLIMITED_BANDWIDTH, "downtime-limit": 300,
                                      **mq.NO_THROTTLE})
        if v.perf:
            perf = subprocess.Popen(
                ["perf", "record", "-q", "-e", "cpu-clock", "-F", "2000", "-k", "CLOCK_REALTIME",
                 "--call-graph", "dwarf,8192", "-p", str(proc.pid), "-o", str(work / "perf.data")],
                stdout=subprocess.DEVNULL, stderr=(work / "perf.log").open("w"))
            await asyncio.sleep(1.0)
        since = time.time() - 1
        seen = src.last_seq
        await mq.migrate(src, uri)
        while True:
            e = await src.wait_event("MIGRATION", timeout_s=60, after_seq=seen)
            if e is None:
                raise RuntimeError("the source reported no migration event in 60 s")
            seen = e.seq
            status = e.data.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise RuntimeError(f"the migration {status}")
        got_completed = time.time()
        if v.paused:
            # the agents: confirm to the target, which checks its stream completed and runs `cont`
            seen_dst = 0
            while str((await mq.query_migrate(dst)).get("status")) != "completed":
                e = await dst.wait_event("MIGRATION", timeout_s=10, after_seq=seen_dst)
                seen_dst = e.seq if e else seen_dst
            if injector is not None:
                assert injector.stdin is not None and injector.stdout is not None
                injector.stdin.write("go\n")
                injector.stdin.flush()
                marks["fdb_rarp_sent"] = float(injector.stdout.readline())
            await asyncio.sleep(max(0.0, got_completed + v.confirm_delay_ms / 1000 - time.time()))
            if v.nice:
                for t in Path(f"/proc/{proc.pid}/task").iterdir():
                    os.setpriority(os.PRIO_PROCESS, int(t.name), v.nice)
            marks["cont_sent"] = time.time()
            await dst.cont()
        else:
            while not (await dst.query_status()).running:
                await dst.wait_event("RESUME", timeout_s=10)
        marks["cont_returned"] = time.time()
        with contextlib.suppress(Exception):
            await mq.announce_self(dst)
        marks["announce_self_returned"] = time.time()
        marks["qemu_downtime_ms"] = (await mq.query_migrate(src)).get("downtime")
        jit: list[tuple[float, int | None]] = []
        base = marks["cont_returned"]
        for ms in v.jit_samples_ms:
            await asyncio.sleep(max(0.0, base + ms / 1000 - time.time()))
            jit.append((round((time.time() - base) * 1000, 1), await jit_tb_count(dst)))
        if jit:
            marks["jit_tb_count_ms_after_cont"] = jit
        if v.quit_source_after_s:
            await asyncio.sleep(max(0.0, base + v.quit_source_after_s - time.time()))
        marks["source_quit"] = time.time()
        await src.quit()
        await asyncio.sleep(max(0.0, base + 0.6 - time.time()))
        marks["source_stopped"] = last_event(src, "STOP", since)
        marks["last_byte_sent"] = last_event(src, "MIGRATION", since, "completed")
        marks["target_loaded"] = last_event(dst, "MIGRATION", since, "completed")
        marks["target_cont"] = last_event(dst, "RESUME", since)
        marks["source_completed_seen"] = got_completed
        if not v.jit_samples_ms:
            marks["jit_tb_count_end"] = await jit_tb_count(dst)
    finally:
        if injector is not None:
            injector.communicate(input="", timeout=10)
        if perf is not None:
            perf.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                perf.wait(60)
        await src.close()
        await dst.close()
    with contextlib.suppress(OSError):
        os.kill(vm.pid, signal.SIGKILL)  # quit above; this only makes sure
    marks["qemu_trace"] = {"source": read_trace(vm.argv), "target": read_trace(argv)}
    # the source's tap: the agent would delete it when it stops the source; the agents are stopped
    with contextlib.suppress(subprocess.CalledProcessError):
        ip_ns(lay.host_ns(vm.host), "link", "del", "dev", vm.tap)
    return Vm(dst_host, proc.pid, argv, work / "qmp.sock", tap), marks


async def warm_series(vm: Vm, count: int, pause_ms: float) -> list[Json]:
    """`stop`, pause, `cont` of the running QEMU, `count` times, 1 s apart."""
    qmp = await QmpSession.connect(vm.qmp_path, timeout_s=10, name="bx-warm")
    out: list[Json] = []
    try:
        for _ in range(count):
            await asyncio.sleep(1.0)
            tb_before = await jit_tb_count(qmp)
            since = time.time()
            await qmp.stop()
            await asyncio.sleep(pause_ms / 1000)
            await qmp.cont()
            await asyncio.sleep(0.3)
            out.append({"source_stopped": events(qmp, "STOP", since)[-1],
                        "target_cont": events(qmp, "RESUME", since)[-1],
                        "tb_before": tb_before, "tb_after_300ms": await jit_tb_count(qmp)})
    finally:
        await qmp.close()
    return out


# ================================================================ analysis


def analyse(frames: list[list[Any]], marks: Json, udp: Json, mac: str, to_host: int | None) -> Json:
    """Place the sniffer's frames on the axis of the marks (ms from source_stopped)."""
    stop, cont = marks.get("source_stopped"), marks.get("target_cont")
    if stop is None:
        return {}
    port_to = f"h{to_host}-vm" if to_host else None

    def ms(t: float | None) -> float | None:
        return None if t is None else round((t - stop) * 1000, 2)

    sent_at = {f[4]: f[0] for f in frames if f[3] == "req" and f[1] == "client"}
    # the first reply the guest sent after it stopped, seen where it entered the switch
    replies_in = [f for f in frames if f[3] == "rep" and f[1] != "client" and f[0] > stop + 0.001]
    first_in = replies_in[0] if replies_in else None
    replies_out = [f for f in frames if f[3] == "rep" and f[1] == "client" and f[0] > stop + 0.001]
    first_out = replies_out[0] if replies_out else None
    last_before = [f for f in frames if f[3] == "rep" and f[1] == "client" and f[0] <= stop + 0.001]
    guest_frames = [f for f in frames if f[5] == mac and f[1] != "client" and f[0] > stop - 0.001]
    rarp = [f for f in guest_frames if f[3] == "rarp" and (port_to is None or f[1] == port_to)]
    garp = [f for f in guest_frames if f[3] in ("arp", "ip6")]
    to_target = [f for f in frames if f[3] == "req" and port_to and f[1] == port_to
                 and f[2] == PACKET_OUTGOING and f[0] > stop]
    first_fwd = to_target[0][0] if to_target else None
    backlog = sum(1 for f in to_target if cont is not None and f[0] < cont)
    out: Json = {
        "probe_last_reply_before_gap": ms(last_before[-1][0]) if last_before else None,
        "first_rarp_at_switch": ms(rarp[0][0]) if rarp else None,
        "first_guest_arp_or_ip6": ms(garp[0][0]) if garp else None,
        "first_request_forwarded_to_target": ms(first_fwd),
        "requests_queued_before_cont": backlog if port_to else None,
        "first_reply_left_host": ms(first_in[0]) if first_in else None,
        "first_reply_at_client": ms(first_out[0]) if first_out else None,
        "probe_first_reply_after_gap": ms(udp.get("max_gap_end")),
        "probe_max_gap_ms": udp.get("max_gap_ms"),
    }
    if first_in is not None:
        seq = first_in[4]
        out["first_reply_seq_sent"] = ms(sent_at.get(seq))
        out["first_reply_was_queued_before_cont"] = (cont is not None and seq in sent_at
                                                     and sent_at[seq] < cont)
        # how fast the guest worked through the requests after its first reply (replies in 20 ms)
        t1 = first_in[0]
        out["replies_in_20ms_after_first"] = sum(1 for f in replies_in if t1 <= f[0] < t1 + 0.02)
    for k in ("last_byte_sent", "confirm_sent", "target_loaded", "cont_sent", "target_cont",
              "source_quit", "source_completed_seen"):
        if marks.get(k) is not None:
            out[k] = ms(marks[k])
    if cont is not None and first_in is not None:
        out["cont_to_first_reply_ms"] = round((first_in[0] - cont) * 1000, 2)
    # The client's blackout: from its last reply before the stop to the end of its longest silence
    # that ends within 0.5 s of `cont` (a guest may answer once, then stall again: the blackout
    # spans that blip). The probe's own longest gap may lie elsewhere (a pre-copy stall).
    at_client = [f[0] for f in frames if f[3] == "rep" and f[1] == "client"]
    horizon = (cont or stop) + 0.5
    before = [t for t in at_client if t <= stop + 0.001]
    gaps = [(b - a, a, b) for a, b in itertools.pairwise(at_client) if stop < b <= horizon]
    if before and gaps:
        longest, _, end = max(gaps)
        out["switchover_gap_ms"] = round((end - before[-1]) * 1000, 2)
        out["longest_silence_in_it_ms"] = round(longest * 1000, 2)
        a, b = before[-1], end
        out["switchover_gap_start"], out["switchover_gap_end"] = ms(a), ms(b)
    trace = marks.get("qemu_trace") or {}
    for side in ("source", "target"):
        window = [t for t in trace.get(side, []) if stop - 2 < t[0] < stop + 5]
        for t, event, detail in window:
            if event == "vmstate_downtime_checkpoint":
                out[f"qemu {detail}"] = ms(t)
        slow = []
        for _, event, detail in window:
            m = re.search(r"idstr=(\S+) instance_id=(\d+) downtime=(\d+)", detail)
            if m and event in ("vmstate_downtime_load", "vmstate_downtime_save"):
                slow.append((int(m.group(3)), f"{m.group(1)}/{m.group(2)}"))
        if slow:
            slow.sort(reverse=True)
            out[f"qemu {side} device state us (top 3 of {len(slow)})"] = slow[:3]
            out[f"qemu {side} device state us total"] = sum(d for d, _ in slow)
    return out


def perf_breakdown(work: Path, cont: float, first_reply: float | None) -> Json:
    """Split the target QEMU's cpu-clock samples after `cont`: its vCPU thread (the busiest one)
    translating guest code (tb_gen_code on the stack), in the kernel, in QEMU's own code, in the
    translated code; and its other threads."""
    data = work / "perf.data"
    if not data.exists():
        return {"error": "no perf.data"}
    proc = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,tid,time,ip,sym,dso"],
                          capture_output=True, text=True, timeout=600, check=False)
    windows = {"cont_to_first_reply": (cont, first_reply or cont + 0.1), "cont_to_+300ms": (cont, cont + 0.3)}
    head = re.compile(r"^\s*(\S.*?)\s+(\d+)\s+(\d+\.\d+):\s*$")
    samples: list[tuple[int, float, list[str]]] = []
    cur: tuple[int, float] | None = None
    stack: list[str] = []
    for line in [*proc.stdout.splitlines(), ""]:
        m = head.match(line)
        if m:
            cur, stack = (int(m.group(2)), float(m.group(3))), []
        elif line.strip() and cur is not None:
            stack.append(line.strip())
        elif not line.strip() and cur is not None:
            samples.append((cur[0], cur[1], stack))
            cur = None
    a0, b0 = windows["cont_to_first_reply"]
    per_tid: dict[int, int] = {}
    for tid, t, _ in samples:
        if a0 <= t < b0:
            per_tid[tid] = per_tid.get(tid, 0) + 1
    vcpu = max(per_tid, key=lambda k: per_tid[k]) if per_tid else None
    result: Json = {w: {} for w in windows}
    for tid, t, frames in samples:
        for w, (a, b) in windows.items():
            if not a <= t < b:
                continue
            text = " ".join(frames)
            leaf = frames[0] if frames else ""
            if "tb_gen_code" in text or "translator_loop" in text or "tcg_gen_code" in text:
                what = "translating guest code"
            elif "[kernel" in leaf or "kallsyms" in leaf:
                what = "kernel"
            elif "qemu-system" in leaf:
                what = "QEMU code (helpers, devices, exec loop)"
            else:
                what = "translated guest code / unknown"
            key = f"{'vCPU' if tid == vcpu else 'other threads'}: {what}"
            result[w][key] = result[w].get(key, 0) + 1
    period_ms = 0.5  # perf record -F 2000
    for w in windows:
        result[w] = {k: round(n * period_ms, 1) for k, n in sorted(result[w].items())}
    result["unit"] = "ms of CPU (samples x 0.5 ms)"
    result["window_ms"] = {w: round((b - a) * 1000, 1) for w, (a, b) in windows.items()}
    return result


# ================================================================ main


def spread(values: list[float]) -> Json:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"n": 0}
    return {"n": len(vals), "min": round(min(vals), 1), "median": round(statistics.median(vals), 1),
            "max": round(max(vals), 1)}


def verify(lab: Lab, before: Json) -> Json:
    arrived = sw.guest_check(lab.lay.client_ns, lab.ip)
    passes = int((arrived.get("memtest") or {}).get("passes", 0)) + 2
    after = sw.wait_memtest_passes(lab.lay.client_ns, lab.ip, passes)
    mism = (after.get("memtest") or {}).get("mismatches")
    d0 = (before.get("disklog") or {}).get("durable_seq")
    d1 = (after.get("disklog") or {}).get("durable_seq")
    return {"memtest_mismatches": mism, "disklog": [d0, d1],
            "guest_ok": mism == 0 and d0 is not None and d1 is not None and d1 > d0}


def with_capture(lab: Lab, tag: str, body: Any, probe: bool = True,
                 sched: bool = False) -> tuple[Any, list[list[Any]], Json]:
    """Run body() with the sniffer on the switch's VM ports, (unless body has its own) the UDP probe
    and, with `sched`, a trace of the machine's context switches in work/sched-TAG.data."""
    ifaces = ["client", *(lab.lay.switch_port(k, "vm") for k in lab.lay.host_numbers)]
    trace = SchedTrace(lab.work / f"sched-{tag}.data") if sched else None
    sniffer = Sniffer(lab.lay.switch_ns, ifaces, lab.work / f"frames-{tag}.json")
    lab.helper_pids = {sniffer.proc.pid: "sniffer"}
    udp = udp_probe_process(lab.lay.client_ns, lab.ip) if probe else None
    if udp is not None:
        lab.helper_pids[udp.proc.pid] = "udp probe"
    report: Json = {}
    try:
        time.sleep(0.5)
        result = body()
        time.sleep(0.3)
    finally:
        lab.helper_labels = thread_labels(lab.helper_pids)
        if udp is not None:
            report = udp.stop()
        frames = sniffer.stop()
        if trace is not None:
            trace.stop()
    return result, frames, report


class ThreadWatcher:
    """Every 50 ms, label the threads of the processes `pids()` names (QEMU starts threads late)."""

    def __init__(self, pids: Any) -> None:
        import threading

        self.pids = pids
        self.labels: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(Exception):
                self.labels.update(thread_labels(self.pids()))

    def stop(self) -> dict[int, str]:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self.labels.update(thread_labels(self.pids()))
        return self.labels


def qemu_pids_by_pidfile(files: dict[Path, str]) -> dict[int, str]:
    """pid -> label for each QEMU pid file that exists."""
    out: dict[int, str] = {}
    for pattern, label in files.items():
        for f in map(Path, glob.glob(str(pattern))):
            with contextlib.suppress(OSError, ValueError):
                out[int(f.read_text().split()[0])] = label
    return out


def switchover_windows(marks: Json, first_reply_ms: float | None) -> dict[str, tuple[float, float]]:
    """The switchover's phases as absolute (start, end) pairs, from the marks that exist."""
    stop = marks.get("source_stopped")
    first = None if stop is None or first_reply_ms is None else stop + first_reply_ms / 1000
    points = [("source_stopped", stop), ("last_byte_sent", marks.get("last_byte_sent")),
              ("target_loaded", marks.get("target_loaded")), ("target_cont", marks.get("target_cont")),
              ("first_reply", first)]
    have = [(k, v) for k, v in points if v is not None]
    return {f"{a}..{b}": (ta, tb) for (a, ta), (b, tb) in itertools.pairwise(have) if tb > ta}


def server_legs(lab: Lab, info: sw.LabInfo, count: int, out: Json, sched: bool) -> int:
    """Create the guest, migrate it `count` times through the server; the host it ends on."""
    with VmshiftClient(info.server, info.token, ca_file=info.ca_file, timeout=60) as api:
        lab.ip = sw.create_guest(api)
        sw.wait_memtest_passes(lab.lay.client_ns, lab.ip, 1, timeout_s=300)
        lab.mac = agent_vm(lab.lay, 1).mac
        rec = load_record(lab.name)
        assert rec is not None
        for i in range(1, count + 1):
            to = 2 if str(api.get_vm(sw.VM)["host"]) == "host-1" else 1
            pids = {rec.pids["server"]: "server",
                    **{rec.pids[f"host-{k}"]: f"agent host-{k}" for k in lab.lay.host_numbers}}
            labels = thread_labels(pids)
            pidfiles = {lab.lay.agent_state_dir(3 - to) / "vms" / "*" / "qemu.pid": "source qemu",
                        lab.lay.agent_state_dir(to) / "vms" / "*" / "qemu.pid": "target qemu"}
            watcher = ThreadWatcher(lambda pidfiles=pidfiles: qemu_pids_by_pidfile(pidfiles))
            try:
                leg, frames, _ = with_capture(lab, f"server{i}",
                                              lambda i=i: sw.migrate_once(api, info, lab.ip, i),
                                              probe=False, sched=sched)
            finally:
                labels.update(watcher.stop())
            labels.update(lab.helper_labels)
            res = {"leg": i, "to": to, "status": leg.status, "qemu_downtime_ms": leg.downtime_ms,
                   "marks": dict(leg.timeline),
                   "udp_max_gap_ms": leg.udp_max_gap_ms, "guest_ok": leg.guest_ok,
                   "memtest_mismatches": leg.memtest_mismatches,
                   "marks_ms": analyse(frames, dict(leg.timeline), leg.udp, lab.mac, to)}
            if sched:
                windows = switchover_windows(leg.timeline, res["marks_ms"].get("first_reply_left_host"))
                try:
                    res["cpu"] = cpu_budget(lab.work / f"sched-server{i}.data", windows, labels)
                except Exception as e:  # the raw trace stays in the work dir
                    res["cpu"] = {"error": f"{type(e).__name__}: {e}"}
            out["server_legs"].append(res)
            say(f"server leg {i}: gap {leg.udp_max_gap_ms} ms, downtime {leg.downtime_ms} ms, "
                f"{json.dumps(res['marks_ms'])}")
        return int(str(api.get_vm(sw.VM)["host"]).rsplit("-", 1)[1])


def warm_legs(lab: Lab, vm: Vm, count: int, pause_ms: float, out: Json, sched: bool) -> None:
    before = sw.guest_check(lab.lay.client_ns, lab.ip)
    series, frames, udp = with_capture(lab, "warm", lambda: asyncio.run(warm_series(vm, count, pause_ms)),
                                       sched=sched)
    labels = {**thread_labels({vm.pid: "target qemu"}), **lab.helper_labels}
    for w in series:
        # each pause is its own gap: take the frames around it only
        window = [f for f in frames if w["source_stopped"] - 0.2 < f[0] < w["target_cont"] + 0.5]
        marks_ms = analyse(window, w, {}, lab.mac, None)
        marks_ms["pause_ms"] = round((w["target_cont"] - w["source_stopped"]) * 1000, 2)
        marks_ms["tb_before"], marks_ms["tb_after_300ms"] = w["tb_before"], w["tb_after_300ms"]
        if sched:
            first = marks_ms.get("first_reply_left_host")
            windows = {"target_cont..first_reply": (w["target_cont"], w["source_stopped"] + first / 1000)
                       } if first is not None else {}
            with contextlib.suppress(Exception):
                marks_ms["cpu"] = cpu_budget(lab.work / "sched-warm.data", windows, labels)
        out["warm"].append(marks_ms)
        say(f"warm: {json.dumps(marks_ms)}")
    out["warm_udp"] = udp
    out["warm_guest"] = verify(lab, before)


def cold_legs(lab: Lab, vm: Vm, variants: list[str], per_variant: int, out: Json, sched: bool) -> Vm:
    n = len(list(lab.work.glob("leg*")))
    for vname in variants:
        v = VARIANTS[vname]
        for _ in range(per_variant):
            n += 1
            before = sw.guest_check(lab.lay.client_ns, lab.ip)
            holder: Json = {}

            def leg(v: Variant = v, n: int = n, vm: Vm = vm, holder: Json = holder) -> None:
                holder["vm"], holder["marks"] = asyncio.run(cold_leg(lab, vm, v, n))

            pidfiles = {lab.work / f"leg{n}" / "qemu.pid": "target qemu"}
            watcher = ThreadWatcher(lambda src=vm.pid, pidfiles=pidfiles: {
                src: "source qemu", **qemu_pids_by_pidfile(pidfiles)})
            try:
                _, frames, udp = with_capture(lab, f"cold{n}", leg, sched=sched)
            finally:
                labels = watcher.stop()
            vm, marks = holder["vm"], holder["marks"]
            labels.update(lab.helper_labels)
            (lab.work / "current.json").write_text(json.dumps(vm.__dict__, default=str))
            res = {"leg": n, **{k: marks[k] for k in ("variant", "from", "to", "load")},
                   "qemu_downtime_ms": marks.get("qemu_downtime_ms"), "udp_max_gap_ms": udp.get("max_gap_ms"),
                   "marks": {k: v for k, v in marks.items() if k != "qemu_trace"},
                   "jit": marks.get("jit_tb_count_ms_after_cont") or marks.get("jit_tb_count_end"),
                   "marks_ms": analyse(frames, marks, udp, lab.mac, marks["to"]), "udp": udp}
            if v.perf and marks.get("target_cont"):
                first = res["marks_ms"].get("first_reply_left_host")
                first_at = None if first is None else marks["source_stopped"] + first / 1000
                res["perf"] = perf_breakdown(lab.work / f"leg{n}", marks["target_cont"], first_at)
            if sched:
                windows = switchover_windows(marks, res["marks_ms"].get("first_reply_left_host"))
                try:
                    res["cpu"] = cpu_budget(lab.work / f"sched-cold{n}.data", windows, labels)
                except Exception as e:  # the raw trace stays in the work dir
                    res["cpu"] = {"error": f"{type(e).__name__}: {e}"}
            res.update(verify(lab, before))
            out["cold_legs"].append(res)
            say(f"cold leg {n} {vname}: gap {udp.get('max_gap_ms')} ms, downtime "
                f"{res['qemu_downtime_ms']} ms, {json.dumps(res['marks_ms'])} guest_ok {res['guest_ok']}")
    return vm


def run(args: argparse.Namespace) -> Json:
    """With --lab, reuse a lab brought up by hand (and leave it up); else bring one up and down."""
    side = sw.current_side()
    own = args.lab is None
    name = args.lab or f"bx{os.urandom(3).hex()}"
    out: Json = {"started_at": datetime.now(UTC).isoformat(timespec="seconds"), "lab": name,
                 "command": " ".join(sys.argv), "code": side.code, "server_legs": [], "warm": [],
                 "cold_legs": []}
    try:
        if own:
            say(f"lab {name} up")
            info = sw.lab_up(side, name)
        rec = load_record(name)
        assert rec is not None
        work = Path(f"/tmp/bx-{name}")
        work.mkdir(exist_ok=True)
        lab = Lab(name, rec.layout, "", work)
        state = work / "current.json"
        if state.exists():  # a lab this script already drives by QMP
            saved = json.loads(state.read_text())
            vm = Vm(**{**saved, "qmp_path": Path(saved["qmp_path"])})
            lab.mac = vm.mac
            lab.ip = re.search(r"vmshift\.ip=([0-9.]+)", " ".join(vm.argv)).group(1)  # type: ignore[union-attr]
        else:
            if not own:
                env = sw._json_out(sw._run([str(side.vmshift), "lab", "env", "--name", name, "--json"], 60),
                                   "vmshift lab env")
                info = sw.LabInfo(name, str(env["VMSHIFT_SERVER"]), str(env["VMSHIFT_TOKEN"]),
                                  rec.layout.client_ns, env.get("VMSHIFT_CA_FILE"))
            host = server_legs(lab, info, args.server_legs, out, args.sched)
            say("stopping the server and both agents (the QEMU keeps running)")
            processes.stop_server(rec)
            for k in rec.layout.host_numbers:
                processes.stop_agent(rec, k)
            vm = agent_vm(rec.layout, host)
            state.write_text(json.dumps(vm.__dict__, default=str))
        if args.warm:
            warm_legs(lab, vm, args.warm, args.warm_pause_ms, out, args.sched)
        if args.legs:
            cold_legs(lab, vm, args.variants.split(","), args.legs, out, args.sched)
    except KeyboardInterrupt:
        out["error"] = "interrupted"
    except Exception as e:  # recorded; the lab still goes down
        out["error"] = f"{type(e).__name__}: {e}"
        say(f"stopped: {out['error']}")
    finally:
        if own:
            say(f"lab {name} down")
            out["teardown_problems"] = sw.lab_down(side, name)
    out["summary"] = summary(out)
    return out


PHASES = (  # (name, from mark, to mark): consecutive, so they add up to the client's gap
    ("gap opens before the source stops", "switchover_gap_start", "source_stopped"),
    ("source: stop -> last byte (QEMU downtime)", "source_stopped", "last_byte_sent"),
    ("target loads the last bytes", "last_byte_sent", "target_loaded"),
    ("confirm and `cont` (agents, block activation)", "target_loaded", "target_cont"),
    ("guest: `cont` -> client's gap ends", "target_cont", "switchover_gap_end"),
)


def budget(leg: Json) -> Json:
    """The client's gap split into consecutive phases (ms), plus where the CPU went after `cont`."""
    m = {**leg.get("marks_ms", {}), "source_stopped": 0.0}
    out: Json = {}
    for name, a, b in PHASES:
        if m.get(a) is not None and m.get(b) is not None:
            out[name] = round(m[b] - m[a], 1)
    if m.get("last_byte_sent") is None and m.get("target_cont") is not None:
        out["warm: stop -> cont (the pause)"] = m["target_cont"]
    if m.get("switchover_gap_ms") is not None:
        out["sum = client's blackout (last reply before stop -> gap ends)"] = m["switchover_gap_ms"]
        out["longest silence in it"] = m.get("longest_silence_in_it_ms")
    if m.get("cont_to_first_reply_ms") is not None:
        out["`cont` -> first reply leaves the host"] = m["cont_to_first_reply_ms"]
    if m.get("confirm_sent") is not None:
        out["source agent: last byte -> confirm sent"] = round(m["confirm_sent"] - m["last_byte_sent"], 1)
    cpu = (leg.get("cpu") or m.get("cpu") or {}).get("target_cont..first_reply") or {}
    if cpu:
        on = cpu.get("on_cpu_ms", {})
        out["after cont: vCPU on CPU"] = on.get("target qemu vCPU")
        out["after cont: vCPU runnable, not running"] = (cpu.get("runnable_not_running_ms") or {}).get(
            "target qemu vCPU")
        out["after cont: other processes on CPU (2 cores)"] = round(sum(v for k, v in on.items()
                                                              if k.startswith("other")), 1)
    perf = (leg.get("perf") or {}).get("cont_to_first_reply") or {}
    if perf:
        out["after cont: vCPU translating (perf)"] = perf.get("vCPU: translating guest code")
    return out


def summary(out: Json) -> Json:
    """Median (min..max) of each budget line per group of legs."""
    groups: dict[str, list[Json]] = {"server": out["server_legs"]} if out["server_legs"] else {}
    if out["warm"]:
        ok = bool((out.get("warm_guest") or {}).get("guest_ok"))
        groups["warm stop/cont"] = [{"marks_ms": w, "cpu": w.get("cpu"), "guest_ok": ok} for w in out["warm"]]
    for leg in out["cold_legs"]:
        groups.setdefault(leg["variant"], []).append(leg)
    s: Json = {}
    for name, legs in groups.items():
        rows: dict[str, list[float]] = {}
        for leg in legs:
            for k, v in budget(leg).items():
                if isinstance(v, int | float):
                    rows.setdefault(k, []).append(float(v))
            for k in ("qemu_downtime_ms", "udp_max_gap_ms"):
                if isinstance(leg.get(k), int | float):
                    rows.setdefault(k, []).append(float(leg[k]))
            jit = leg.get("jit")
            if isinstance(jit, int):
                rows.setdefault("TBs translated by +0.6 s after cont", []).append(float(jit))
            queued = (leg.get("marks_ms") or {}).get("requests_queued_before_cont")
            if isinstance(queued, int):
                rows.setdefault("requests queued in the target's tap before cont", []).append(float(queued))
        s[name] = {k: spread(v) for k, v in rows.items()}
        s[name]["legs"] = len(legs)
        s[name]["guest_ok"] = sum(1 for leg in legs if leg.get("guest_ok"))
    return s


def markdown(out: Json) -> str:
    """One table: a column per group of legs, a row per budget line, cells median (min-max)."""
    summ = out["summary"]
    names = list(summ)
    order = [name for name, _, _ in PHASES]
    order += ["sum = client's blackout (last reply before stop -> gap ends)", "longest silence in it",
              "udp_max_gap_ms", "qemu_downtime_ms",
              "source agent: last byte -> confirm sent", "`cont` -> first reply leaves the host"]
    rows = [r for r in order if any(r in summ[n] for n in names)]
    for name in names:
        for k in summ[name]:
            if k not in rows and k not in ("legs", "guest_ok"):
                rows.append(k)

    def cell(st: Any) -> str:
        if not isinstance(st, dict) or not st.get("n"):
            return "-"
        if st["n"] == 1:
            return f"{st['median']:g}"
        return f"{st['median']:g} ({st['min']:g}-{st['max']:g})"

    lines = ["| ms, median (min-max) | " + " | ".join(f"{n} ({summ[n]['legs']})" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    lines += [f"| {r} | " + " | ".join(cell(summ[n].get(r)) for n in names) + " |" for r in rows]
    lines.append("| guest verified (memtest 0 mismatches, disklog on) | "
                 + " | ".join(f"{summ[n]['guest_ok']}/{summ[n]['legs']}" for n in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    sn = sub.add_parser("sniff")
    sn.add_argument("--out", type=Path, required=True)
    sn.add_argument("ifaces", nargs="+")
    rep = sub.add_parser("report", help="print the table of a result file again")
    rep.add_argument("result", type=Path)
    inj = sub.add_parser("inject")
    inj.add_argument("iface")
    inj.add_argument("mac")
    ap.add_argument("--server-legs", type=int, default=4)
    ap.add_argument("--warm", type=int, default=8)
    ap.add_argument("--warm-pause-ms", type=float, default=40.0)
    ap.add_argument("--legs", type=int, default=3, help="cold legs per variant")
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "postcopy-cap"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-sched", dest="sched", action="store_false",
                    help="no perf trace of the machine's context switches around each leg")
    ap.add_argument("--lab", help="use this lab (brought up by hand, left up) instead of a new one")
    args = ap.parse_args(argv)
    if args.cmd == "sniff":
        return sniff_main(args.ifaces, args.out)
    if args.cmd == "inject":
        return inject_main(args.iface, args.mac)
    if args.cmd == "report":
        data = json.loads(args.result.read_text())
        data["summary"] = summary(data)
        print(markdown(data))
        return 0
    if os.geteuid() != 0:
        print("Run it as root (network namespaces).", file=sys.stderr)
        return 2
    for vname in args.variants.split(","):
        if vname not in VARIANTS:
            ap.error(f"unknown variant {vname!r}; known: {', '.join(VARIANTS)}")

    def _term(_s: int, _f: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    path = args.json or REPO / "bench" / "results" / f"blackout_probe-{datetime.now(UTC).date()}.json"
    with tempfile.TemporaryDirectory(prefix="vmshift-bx-config-") as cfg:
        os.environ["VMSHIFT_CONFIG_DIR"] = cfg
        out = run(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(markdown(out))
    say(f"wrote {path}")
    return 0 if "error" not in out and not out.get("teardown_problems") else 1


if __name__ == "__main__":
    raise SystemExit(main())
