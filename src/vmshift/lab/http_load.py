"""HTTP load on the lab guest's busybox httpd: GET / at a fixed rate, a new connection each.

Run through `python -m vmshift.lab.probe http IP` (vmshift.lab.probe) inside the lab's client
namespace; `summarize_http` turns the requests into the report (requests, failures by kind, p50/p99
and worst latency).
"""

from __future__ import annotations

import http.client
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vmshift.lab.image import GUEST_SOURCES, HTTP_PAGE

HTTP_PORT = 80
HTTP_FAILURES_LISTED = 50  # failures listed one by one in the summary; the counts cover all of them


@dataclass(frozen=True)
class HttpResult:
    """One GET: when it started (seconds since the load began), how long it took, how it failed."""

    t_s: float
    latency_s: float
    error: str | None = None  # None = 200 with the expected body; else a kind, see http_get
    detail: str = ""


def percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile (the smallest value with at least pct % of them at or below it)."""
    if not 0 < pct <= 100:
        raise ValueError(f"percentile {pct} is not in (0, 100]")
    if not sorted_values:
        return None
    rank = math.ceil(pct / 100 * len(sorted_values))
    return sorted_values[max(rank, 1) - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def summarize_http(
    results: Sequence[HttpResult],
    *,
    duration_s: float,
    skipped: int = 0,
    max_listed: int = HTTP_FAILURES_LISTED,
) -> dict[str, Any]:
    """The HTTP load report.

    Latencies cover every request, failed ones included (a timeout counts as the time until the
    client gave up): a client of a migrating guest feels those too. `failures` lists the first
    `max_listed` failures in time order; `failed_by_kind`, `first_failure_t_s` and
    `last_failure_t_s` cover all of them. `skipped` is the number of due requests not sent because
    every connection slot was busy (the load does not burst to catch up).
    """
    ordered = sorted(results, key=lambda r: r.t_s)
    failures = [r for r in ordered if r.error is not None]
    latencies = sorted(r.latency_s for r in ordered)
    worst = max(ordered, key=lambda r: r.latency_s, default=None)
    return {
        "requests": len(ordered),
        "ok": len(ordered) - len(failures),
        "failed": len(failures),
        "skipped": skipped,
        "duration_s": round(duration_s, 3),
        "worst_latency_ms": _ms(worst.latency_s if worst else None),
        "worst_latency_t_s": round(worst.t_s, 3) if worst else None,
        "p50_latency_ms": _ms(percentile(latencies, 50)),
        "p99_latency_ms": _ms(percentile(latencies, 99)),
        "failed_by_kind": dict(sorted(Counter(str(r.error) for r in failures).items())),
        "first_failure_t_s": round(failures[0].t_s, 3) if failures else None,
        "last_failure_t_s": round(failures[-1].t_s, 3) if failures else None,
        "failures": [
            {"t_s": round(r.t_s, 3), "error": r.error, "detail": r.detail, "latency_ms": _ms(r.latency_s)}
            for r in failures[:max_listed]
        ],
        "failures_not_listed": max(len(failures) - max_listed, 0),
    }


def http_page() -> bytes:
    """The body the guest's httpd serves as / (the image copies this file to /www/index.html)."""
    return (GUEST_SOURCES / HTTP_PAGE).read_bytes()


def http_get(
    ip: str, expected: bytes, timeout_s: float = 5.0, port: int = HTTP_PORT
) -> tuple[str | None, str]:
    """GET / on a new connection: (None, "") when it answered 200 with `expected`, else (kind, detail).

    Kinds: refused, timeout, reset (reset, aborted or closed before the reply), status (not 200),
    body (not `expected`), protocol (an unparsable reply), error (any other socket error, e.g. no
    route to the host). `timeout_s` bounds each socket operation, not the whole request.
    """
    conn = http.client.HTTPConnection(ip, port, timeout=timeout_s)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read()
    except ConnectionRefusedError as e:
        return "refused", str(e)
    except TimeoutError as e:
        return "timeout", str(e) or "timed out"
    except ConnectionError as e:  # reset, aborted, broken pipe, http.client.RemoteDisconnected
        return "reset", f"{type(e).__name__}: {e}"
    except http.client.HTTPException as e:
        return "protocol", f"{type(e).__name__}: {e}"
    except OSError as e:
        return "error", f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    if resp.status != 200:
        return "status", f"HTTP {resp.status} {resp.reason}"
    if body != expected:
        return "body", f"{len(body)} bytes that are not the {len(expected)}-byte page"
    return None, ""


class HttpLoad:
    """GET / at a fixed rate, a new TCP connection each, at most `concurrency` in flight.

    Requests are due every 1 / rate seconds from the start (rate 0: back to back on every slot).
    A due request waits for a free slot; due times that pass meanwhile are skipped, not sent in a
    burst afterwards, so a stalled guest sees the same offered load once it answers again.
    """

    def __init__(
        self, ip: str, rate: float = 50.0, concurrency: int = 4, timeout_s: float = 5.0, port: int = HTTP_PORT
    ) -> None:
        if rate < 0 or concurrency < 1 or timeout_s <= 0:
            raise ValueError("rate must be >= 0, concurrency >= 1 and timeout > 0")
        self.ip = ip
        self.rate = rate
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.port = port
        self.expected = http_page()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._results: list[HttpResult] = []

    def request_stop(self) -> None:
        """Ask run() to send no more requests (safe from signal handlers and threads)."""
        self._stop.set()

    def run(self, seconds: float | None = None) -> dict[str, Any]:
        """Send requests until seconds elapse or request_stop(); wait for those in flight; report."""
        start = time.monotonic()
        started_at = time.time()
        end = None if seconds is None else start + seconds
        slots = threading.Semaphore(self.concurrency)
        jobs: queue.Queue[bool] = queue.Queue()
        workers = [
            threading.Thread(target=self._worker, args=(jobs, slots, start), name=f"http-{i}", daemon=True)
            for i in range(self.concurrency)
        ]
        for w in workers:
            w.start()
        interval = 1 / self.rate if self.rate else 0.0
        next_due = start
        skipped = 0

        def running() -> bool:
            return not self._stop.is_set() and (end is None or time.monotonic() < end)

        def free_slot() -> bool:
            while not slots.acquire(timeout=0.05):
                if not running():
                    return False
            return True

        while running():
            self._stop.wait(max(next_due - time.monotonic(), 0))
            if not running() or not free_slot():
                break
            if interval:
                late = int((time.monotonic() - next_due) / interval)  # due times missed waiting for a slot
                skipped += late
                next_due += (late + 1) * interval
            jobs.put(True)
        for _ in workers:
            jobs.put(False)
        for w in workers:
            w.join(3 * self.timeout_s + 5)  # connect, send and receive each time out on their own
        with self._lock:
            results = list(self._results)
        report = summarize_http(results, duration_s=time.monotonic() - start, skipped=skipped)
        report.update(rate=self.rate, concurrency=self.concurrency, timeout_s=self.timeout_s,
                      started_at=round(started_at, 6))  # fmt: skip
        return report

    def _worker(self, jobs: queue.Queue[bool], slots: threading.Semaphore, start: float) -> None:
        while jobs.get():
            t0 = time.monotonic()
            try:
                kind, detail = http_get(self.ip, self.expected, self.timeout_s, self.port)
            except Exception as e:  # a bug here must not leave the slot taken and the run hanging
                kind, detail = "error", f"{type(e).__name__}: {e}"
            result = HttpResult(t0 - start, time.monotonic() - t0, kind, detail)
            with self._lock:
                self._results.append(result)
            slots.release()
