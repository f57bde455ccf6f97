"""What every benchmark leg measures from outside the guest, the same way for vmshift and its peers.

During a leg the client namespace runs a 1 ms UDP echo probe (the longest gap is the blackout a
client feels), a TCP connection that must survive, an HTTP load when the guest serves HTTP, and a
sampler of the guest's memtest counters (its page rate before and during the move is the guest's
slowdown). After the leg the guest must finish another memtest pass with 0 mismatches, answer its
echo port and have written more durable disklog records.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmshift.lab.probe import BackgroundProbe, http_load_process, tcp_hold_process, udp_probe_process

Json = dict[str, Any]
REPO = Path(__file__).resolve().parents[2]
BEFORE_S = 2.0  # the guest's page rate before the leg is measured over this long


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Sampler:
    """bench.suite.guest_sampler in the client namespace."""

    def __init__(self, ns: str, ip: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "bench.suite.guest_sampler", ip],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )

    def stop(self) -> Json:
        import json

        out, err = self.proc.communicate(input="", timeout=30)
        try:
            data: Json = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"points": [], "error": err.strip()[-300:]}
        return data


def page_rate(points: list[list[float]], t0: float, t1: float) -> float | None:
    """memtest pages per second between the first and last sample inside [t0, t1]."""
    inside = [p for p in points if t0 <= p[0] <= t1]
    if len(inside) < 2 or inside[-1][0] - inside[0][0] < 0.2:
        return None
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


@dataclass
class Observers:
    """The probes of one leg: start() before the move, stop() after it."""

    ns: str
    ip: str
    http: bool = False
    probes: dict[str, BackgroundProbe] = field(default_factory=dict)
    sampler: Sampler | None = None
    started: float = 0.0
    move_started: float = 0.0
    move_ended: float = 0.0

    def start(self) -> None:
        self.sampler = Sampler(self.ns, self.ip)
        self.probes["udp"] = udp_probe_process(self.ns, self.ip)
        self.probes["tcp"] = tcp_hold_process(self.ns, self.ip)
        if self.http:
            self.probes["http"] = http_load_process(self.ns, self.ip, rate=50, concurrency=4)
        self.started = time.monotonic()
        time.sleep(BEFORE_S)

    def mark_start(self) -> None:
        self.move_started = time.monotonic()

    def mark_end(self) -> None:
        self.move_ended = time.monotonic()

    def stop(self) -> Json:
        time.sleep(0.5)  # replies right after the switchover belong to the leg
        out: Json = {}
        for name, probe in self.probes.items():
            try:
                out[name] = probe.stop()
            except Exception as e:
                out[name] = {"error": str(e)}
        points = self.sampler.stop()["points"] if self.sampler else []
        before = page_rate(points, self.started, self.move_started)
        during = page_rate(points, self.move_started, self.move_ended or time.monotonic())
        out["pages_per_s_before"] = round(before, 1) if before is not None else None
        out["pages_per_s_during"] = round(during, 1) if during is not None else None
        out["slowdown"] = round(1 - during / before, 3) if before and during is not None else None
        return out


def summary(obs: Json) -> Json:
    """The client-side figures of a leg, flat."""
    udp, tcp, http = obs.get("udp") or {}, obs.get("tcp") or {}, obs.get("http")
    return {
        "max_gap_ms": udp.get("max_gap_ms"),
        "tcp_kept": bool(tcp.get("survived")) if tcp else None,
        "tcp_max_gap_ms": tcp.get("max_gap_ms"),
        "http_failed": http.get("failed") if http else None,
        "http_requests": http.get("requests") if http else None,
        "http_worst_ms": http.get("worst_latency_ms") if http else None,
        "pages_per_s_before": obs.get("pages_per_s_before"),
        "pages_per_s_during": obs.get("pages_per_s_during"),
        "slowdown": obs.get("slowdown"),
    }
