"""Client-side probes of a lab guest; run inside the lab's client namespace.

    python -m vmshift.lab.probe check IP          -> {"echo": true, "memtest": {...}, "disklog": {...},
                                                       "diskwrite": {...}}
    python -m vmshift.lab.probe verify IP         -> {"disklog": {"checked": N, "bad": N, ...},
                                                       "diskwrite": {...}}: the guest re-reads its rings
    python -m vmshift.lab.probe udp IP --seconds S -> {"sent": N, "received": N, "lost": N, "max_gap_ms": X,
                                                       "max_gap_start": T0, "max_gap_end": T1}
    python -m vmshift.lab.probe hold IP [--seconds S] [--interval-ms MS]
        -> one long-lived TCP connection echoing until S elapse, stdin closes or SIGTERM/SIGINT;
           prints {"survived": bool, "echoes": N, "max_gap_ms": X, "error": str|null}
    python -m vmshift.lab.probe http IP [--rate 50] [--concurrency 4] [--timeout 5] [--seconds S]
        -> GET / at RATE requests/s (a new TCP connection each), at most CONCURRENCY in flight, until
           S elapse (stdin is then ignored) or, without --seconds, until stdin closes; SIGTERM/SIGINT
           stop it too. Prints the summary of `summarize_http` (requests, ok, failed, latencies ...).

The guest (src/vmshift/lab/guest) echoes bytes on TCP 7000 and datagrams on UDP 7001, writes one
JSON status line to every connection on TCP 7002, verifies its disk log and disk writer on every
connection to TCP 7003 and, booted with vmshift.httpd=1, serves lab/guest/index.html as / on TCP 80.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmshift.errors import LabError
from vmshift.lab.http_load import HttpLoad

ECHO_PORT = 7000
UDP_PORT = 7001
STATUS_PORT = 7002
VERIFY_PORT = 7003
VERIFY_TIMEOUT_S = 120.0  # the guest reads its whole disk-writer device; the writer pauses meanwhile
_UDP_FMT = "!Qd"  # sequence number, send time (monotonic)


def _recv_line(sock: socket.socket, limit: int = 65536) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            break
    return buf


def tcp_echo(ip: str, timeout: float = 5.0) -> bool:
    """Send a random line to the guest's echo port and check it comes back unchanged."""
    line = f"vmshift-probe {secrets.token_hex(16)}\n".encode()
    with socket.create_connection((ip, ECHO_PORT), timeout=timeout) as s:
        s.sendall(line)
        return _recv_line(s) == line


def guest_status(ip: str, timeout: float = 5.0) -> dict[str, Any]:
    with socket.create_connection((ip, STATUS_PORT), timeout=timeout) as s:
        data = json.loads(_recv_line(s))
    if not isinstance(data, dict):
        raise ValueError("the guest status is not a JSON object")
    return data


def guest_verify(ip: str, timeout: float = VERIFY_TIMEOUT_S) -> dict[str, Any]:
    """Ask the guest to re-read its disk log and disk writer rings now (TCP 7003); its one-line answer.

    Each of ``disklog`` and ``diskwrite`` is null when off, else ``{from_seq, to_seq, checked,
    missing, corrupt, bad, torn, ms, error}``: every sequence number in [from_seq, to_seq] must be
    intact in its slot, so ``bad == 0`` and ``error is None`` is the verdict (docs/guest-image.md).
    """
    with socket.create_connection((ip, VERIFY_PORT), timeout=timeout) as s:
        data = json.loads(_recv_line(s))
    if not isinstance(data, dict):
        raise ValueError("the guest's verify answer is not a JSON object")
    return data


def verify_ok(answer: dict[str, Any]) -> bool:
    """True when every ring the guest verified (disk log, disk writer) is intact and was readable."""
    rings = [r for r in (answer.get("disklog"), answer.get("diskwrite")) if r is not None]
    return bool(rings) and all(r.get("error") is None and r.get("bad") == 0 for r in rings)


def check(ip: str, timeout: float = 5.0) -> dict[str, Any]:
    result: dict[str, Any] = {"echo": False, "memtest": None, "disklog": None, "diskwrite": None}
    try:
        result["echo"] = tcp_echo(ip, timeout)
        status = guest_status(ip, timeout)
        result["memtest"] = status.get("memtest")
        result["disklog"] = status.get("disklog")
        dw = status.get("diskwrite")
        result["diskwrite"] = dw if isinstance(dw, dict) and dw.get("enabled") else None
        result["uptime_s"] = status.get("uptime_s")
    except (OSError, ValueError) as e:
        result["error"] = f"{type(e).__name__}: {e}"
    return result


def udp_probe(
    ip: str,
    seconds: float,
    interval_s: float = 0.001,
    grace_s: float = 0.3,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Send a numbered datagram every interval_s; count replies and the longest silence between them.

    Sending ends after `seconds`, or earlier once `stop` is set.

    The silence before the first reply and after the last one (up to the last send) counts too, so a
    guest that stops answering for good shows a large gap, not just losses.

    `max_gap_start` / `max_gap_end` are the wall-clock times (epoch seconds, `time.time()`'s clock) of
    the reply before the longest gap and of the reply that ended it, so the gap can be placed beside
    timestamps taken by other processes (a migration's timeline). A gap before the first reply starts
    at the first send; one after the last reply ends at the last send.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((ip, UDP_PORT))
    sock.setblocking(False)
    seen: set[int] = set()
    sent = 0
    start = time.monotonic()
    # Gaps are timed on the monotonic clock; this offset only places them on the wall clock.
    wall_offset = time.time() - start
    last_reply = start
    max_gap = 0.0
    max_gap_at = (start, start)
    end_send = start + seconds
    deadline = end_send + grace_s
    last_send = start
    next_send = start
    try:
        while True:
            now = time.monotonic()
            if stop is not None and stop.is_set() and end_send > now:
                end_send, deadline = now, now + grace_s
            if now < end_send and now >= next_send:
                try:
                    sock.send(struct.pack(_UDP_FMT, sent, now))
                    last_send = now
                except OSError:
                    pass  # e.g. no ARP answer yet: counts as lost
                sent += 1
                # Keep the 1 ms pace without bursting to catch up after the probe itself stalled.
                next_send = max(next_send + interval_s, now)
                continue
            if now >= deadline:
                break
            wait = (min(next_send, end_send) if now < end_send else deadline) - now
            ready, _, _ = select.select([sock], [], [], max(wait, 0))
            if not ready:
                continue
            while True:
                try:
                    data = sock.recv(64)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                if len(data) < struct.calcsize(_UDP_FMT):
                    continue
                seq, _ = struct.unpack_from(_UDP_FMT, data)
                if seq in seen or seq >= sent:
                    continue
                seen.add(seq)
                t = time.monotonic()
                if t - last_reply > max_gap:
                    max_gap, max_gap_at = t - last_reply, (last_reply, t)
                last_reply = t
    finally:
        sock.close()
    if last_send - last_reply > max_gap:
        max_gap, max_gap_at = last_send - last_reply, (last_reply, last_send)
    return {
        "sent": sent,
        "received": len(seen),
        "lost": sent - len(seen),
        "max_gap_ms": round(max_gap * 1000, 2),
        "max_gap_start": round(max_gap_at[0] + wall_offset, 6),
        "max_gap_end": round(max_gap_at[1] + wall_offset, 6),
    }


class TcpHold:
    """One TCP connection to the guest's echo port, echoing every interval; did it survive?"""

    def __init__(self, ip: str, interval_s: float = 0.1, io_timeout_s: float = 30.0) -> None:
        self.ip = ip
        self.interval_s = interval_s
        self.io_timeout_s = io_timeout_s
        self.echoes = 0
        self.max_gap_s = 0.0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self, seconds: float | None = None) -> dict[str, Any]:
        """Echo until seconds elapse or stop() is called (blocking); returns the report."""
        end = None if seconds is None else time.monotonic() + seconds
        try:
            with socket.create_connection((self.ip, ECHO_PORT), timeout=self.io_timeout_s) as s:
                last_ok = time.monotonic()
                while not self._stop.is_set() and (end is None or time.monotonic() < end):
                    line = f"hold {self.echoes} {secrets.token_hex(8)}\n".encode()
                    s.sendall(line)
                    if _recv_line(s) != line:
                        raise ConnectionError("the echo came back different or the connection closed")
                    now = time.monotonic()
                    self.max_gap_s = max(self.max_gap_s, now - last_ok)
                    last_ok = now
                    self.echoes += 1
                    self._stop.wait(self.interval_s)
        except OSError as e:
            self.error = f"{type(e).__name__}: {e}"
        return self.report()

    def request_stop(self) -> None:
        """Ask run() to finish after the current echo (safe from signal handlers and threads)."""
        self._stop.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"tcp-hold-{self.ip}", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.io_timeout_s + 5)
        return self.report()

    def report(self) -> dict[str, Any]:
        return {
            "survived": self.error is None and self.echoes > 0,
            "echoes": self.echoes,
            "max_gap_ms": round(self.max_gap_s * 1000, 2),
            "error": self.error,
        }


@dataclass
class BackgroundProbe:
    """A probe running in a lab's client namespace, in a subprocess a caller starts and stops.

    Closing the subprocess's stdin is the signal to stop; it then prints its JSON report.
    """

    def __init__(self, proc: subprocess.Popen[str], what: str) -> None:
        self.proc = proc
        self.what = what

    @classmethod
    def start(cls, client_ns: str, args: list[str], what: str) -> BackgroundProbe:
        cmd = ["ip", "netns", "exec", client_ns, sys.executable, "-m", "vmshift.lab.probe", *args]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        return cls(proc, what)

    def stop(self, timeout: float = 40.0) -> dict[str, Any]:
        """Close its stdin (the signal to stop) and return its report."""
        try:
            out, err = self.proc.communicate(input="", timeout=timeout)
        except subprocess.TimeoutExpired as e:
            self.proc.kill()
            self.proc.communicate()
            raise LabError(f"The {self.what} probe did not stop in time.") from e
        try:
            report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError) as e:
            raise LabError(f"The {self.what} probe failed: {err.strip()[-500:]}") from e
        return report


def tcp_hold_process(client_ns: str, ip: str, interval_ms: float = 100) -> BackgroundProbe:
    """A TcpHold (one long-lived echoing TCP connection) in the client namespace until stopped."""
    return BackgroundProbe.start(client_ns, ["hold", ip, "--interval-ms", str(interval_ms)], "TCP hold")


def udp_probe_process(client_ns: str, ip: str) -> BackgroundProbe:
    """A 1 ms UDP echo probe in the client namespace that runs until stopped."""
    return BackgroundProbe.start(client_ns, ["udp", ip, "--until-stopped"], "UDP")


def http_load_process(
    client_ns: str, ip: str, rate: float = 50.0, concurrency: int = 4, timeout_s: float = 5.0
) -> BackgroundProbe:
    """An HttpLoad (GET / at `rate` per second, new connection each) in the client namespace until stopped."""
    args = ["http", ip, "--rate", str(rate), "--concurrency", str(concurrency), "--timeout", str(timeout_s)]
    return BackgroundProbe.start(client_ns, args, "HTTP load")


def _stop_on_stdin_close(stop: Callable[[], None]) -> None:
    def wait() -> None:  # closing stdin is the caller's way to stop the probe
        sys.stdin.read()
        stop()

    threading.Thread(target=wait, daemon=True).start()


def _hold_main(ip: str, seconds: float | None, interval_ms: float) -> dict[str, Any]:
    hold = TcpHold(ip, interval_s=interval_ms / 1000)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: hold.request_stop())

    _stop_on_stdin_close(hold.request_stop)
    return hold.run(seconds)


def _http_main(
    ip: str, seconds: float | None, rate: float, concurrency: int, timeout_s: float
) -> dict[str, Any]:
    load = HttpLoad(ip, rate=rate, concurrency=concurrency, timeout_s=timeout_s)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: load.request_stop())
    if seconds is None:  # with --seconds, stdin may be /dev/null (a script, nohup): do not watch it
        _stop_on_stdin_close(load.request_stop)
    return load.run(seconds)


def _udp_until_stopped(ip: str) -> dict[str, Any]:
    stop = threading.Event()
    _stop_on_stdin_close(stop.set)
    return udp_probe(ip, seconds=24 * 3600, stop=stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmshift.lab.probe")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_check = sub.add_parser("check")
    p_check.add_argument("ip")
    p_verify = sub.add_parser("verify")
    p_verify.add_argument("ip")
    p_verify.add_argument("--timeout", type=float, default=VERIFY_TIMEOUT_S)
    p_udp = sub.add_parser("udp")
    p_udp.add_argument("ip")
    p_udp.add_argument("--seconds", type=float, default=5.0)
    p_udp.add_argument("--until-stopped", action="store_true", help="run until stdin closes")
    p_hold = sub.add_parser("hold")
    p_hold.add_argument("ip")
    p_hold.add_argument("--seconds", type=float, default=None)
    p_hold.add_argument("--interval-ms", type=float, default=100.0)
    p_http = sub.add_parser("http")
    p_http.add_argument("ip")
    p_http.add_argument("--rate", type=float, default=50.0, help="requests per second (0 = back to back)")
    p_http.add_argument("--concurrency", type=int, default=4, help="most requests in flight")
    p_http.add_argument("--timeout", type=float, default=5.0, help="seconds per socket operation")
    p_http.add_argument("--seconds", type=float, default=None, help="run this long (else until stdin closes)")
    args = parser.parse_args(argv)
    if args.cmd == "check":
        result = check(args.ip)
        ok = bool(result["echo"]) and "error" not in result
    elif args.cmd == "verify":
        try:
            result = guest_verify(args.ip, args.timeout)
            ok = verify_ok(result)
        except (OSError, ValueError) as e:
            result, ok = {"disklog": None, "diskwrite": None, "error": f"{type(e).__name__}: {e}"}, False
    elif args.cmd == "udp":
        result = _udp_until_stopped(args.ip) if args.until_stopped else udp_probe(args.ip, args.seconds)
        ok = result["received"] > 0
    elif args.cmd == "http":
        result = _http_main(args.ip, args.seconds, args.rate, args.concurrency, args.timeout)
        ok = result["ok"] > 0
    else:
        result = _hold_main(args.ip, args.seconds, args.interval_ms)
        ok = bool(result["survived"])
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
