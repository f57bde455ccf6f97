"""The HTTP load probe: its summary (percentiles, failure counting) and one short run on loopback."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from vmshift.lab.http_load import HttpLoad, HttpResult, http_get, http_page, percentile, summarize_http


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0  # rank ceil(0.5 * 4) = 2, not an interpolation
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == 4.0
    assert percentile([], 50) is None


@pytest.mark.parametrize("pct", [0, -1, 100.5])
def test_percentile_refuses_a_rank_outside_0_100(pct: float) -> None:
    with pytest.raises(ValueError):
        percentile([1.0], pct)


def test_summary_counts_failures_and_times_every_request() -> None:
    results = [
        HttpResult(0.00, 0.002),
        HttpResult(0.02, 0.003),
        HttpResult(1.50, 5.0, "timeout", "timed out"),  # given in no particular order
        HttpResult(0.04, 0.004),
        HttpResult(1.20, 0.001, "refused", "[Errno 111]"),
        HttpResult(2.00, 0.010, "body", "10 bytes"),
        HttpResult(1.30, 0.001, "refused", "[Errno 111]"),
    ]
    s = summarize_http(results, duration_s=3.0, skipped=2)
    assert (s["requests"], s["ok"], s["failed"], s["skipped"]) == (7, 3, 4, 2)
    assert s["failed_by_kind"] == {"body": 1, "refused": 2, "timeout": 1}
    assert [f["t_s"] for f in s["failures"]] == [1.2, 1.3, 1.5, 2.0]
    assert s["failures"][2] == {"t_s": 1.5, "error": "timeout", "detail": "timed out", "latency_ms": 5000.0}
    assert (s["first_failure_t_s"], s["last_failure_t_s"]) == (1.2, 2.0)
    # A timed-out request is the worst latency the client saw.
    assert (s["worst_latency_ms"], s["worst_latency_t_s"]) == (5000.0, 1.5)
    assert s["p50_latency_ms"] == 3.0  # sorted: 1, 1, 2, 3, 4, 10, 5000 ms
    assert s["p99_latency_ms"] == 5000.0
    assert s["failures_not_listed"] == 0


def test_summary_lists_only_the_first_failures_but_counts_them_all() -> None:
    results = [HttpResult(i / 10, 0.001, "reset") for i in range(30)] + [HttpResult(5.0, 0.001)]
    s = summarize_http(results, duration_s=5.0, max_listed=10)
    assert (s["failed"], s["ok"], len(s["failures"]), s["failures_not_listed"]) == (30, 1, 10, 20)
    assert s["failures"][-1]["t_s"] == 0.9
    assert (s["first_failure_t_s"], s["last_failure_t_s"]) == (0.0, 2.9)
    assert s["failed_by_kind"] == {"reset": 30}


def test_summary_of_no_requests() -> None:
    s = summarize_http([], duration_s=0.5)
    assert (s["requests"], s["ok"], s["failed"]) == (0, 0, 0)
    assert s["worst_latency_ms"] is s["p50_latency_ms"] is s["p99_latency_ms"] is None
    assert s["failures"] == [] and s["first_failure_t_s"] is None


def test_the_page_is_a_fixed_4_kib_file() -> None:
    page = http_page()
    assert len(page) == 4096 and page.startswith(b"<!DOCTYPE html>") and page.endswith(b"</html>\n")


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b""
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[http.server.ThreadingHTTPServer, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"body": http_page()})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, handler
    srv.shutdown()
    srv.server_close()


def test_http_get_tells_a_good_page_from_a_bad_body_or_status(
    server: tuple[http.server.ThreadingHTTPServer, type[_Handler]],
) -> None:
    srv, handler = server
    port = srv.server_address[1]
    assert http_get("127.0.0.1", http_page(), 2.0, port) == (None, "")
    assert http_get("127.0.0.1", http_page() + b"x", 2.0, port)[0] == "body"
    handler.status = 503
    assert http_get("127.0.0.1", http_page(), 2.0, port)[0] == "status"
    srv.shutdown()
    srv.server_close()
    assert http_get("127.0.0.1", http_page(), 2.0, port)[0] == "refused"


def test_load_runs_at_its_rate_and_counts_bad_replies(
    server: tuple[http.server.ThreadingHTTPServer, type[_Handler]],
) -> None:
    srv, handler = server
    load = HttpLoad("127.0.0.1", rate=100, concurrency=2, timeout_s=2.0, port=srv.server_address[1])
    stopper = threading.Timer(0.5, load.request_stop)
    stopper.start()
    report = load.run(seconds=10)
    assert 30 <= report["requests"] <= 60  # ~50 due in 0.5 s
    assert report["ok"] == report["requests"] and report["failed"] == 0
    handler.body = b"not the page"
    report = HttpLoad("127.0.0.1", rate=50, concurrency=1, port=srv.server_address[1]).run(seconds=0.3)
    assert report["requests"] >= 5 and report["failed"] == report["requests"]
    assert report["failed_by_kind"] == {"body": report["requests"]}
