"""The guest verify probe: its verdict on the guest's answer, and one answer read from a loopback peer."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from vmshift.lab import probe


def ring(**changes: Any) -> dict[str, Any]:
    base = {"from_seq": 1, "to_seq": 9, "checked": 9, "missing": 0, "corrupt": 0, "bad": 0, "torn": 0,
            "ms": 1.0, "error": None}
    return {**base, **changes}


def test_verdict_needs_every_ring_intact_and_readable() -> None:
    assert probe.verify_ok({"disklog": ring(), "diskwrite": ring()})
    assert probe.verify_ok({"disklog": None, "diskwrite": ring()})
    assert not probe.verify_ok({"disklog": None, "diskwrite": None}), "nothing verified is no verdict"
    assert not probe.verify_ok({"disklog": ring(), "diskwrite": ring(missing=1, bad=1)})
    assert not probe.verify_ok({"disklog": ring(corrupt=2, bad=2), "diskwrite": None})
    assert not probe.verify_ok({"disklog": ring(), "diskwrite": ring(error="cannot open /dev/vdb")})


@pytest.fixture
def guest(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A loopback peer on a free port that answers each connection with one verify line."""
    answer = {"disklog": ring(), "diskwrite": ring(to_seq=300, from_seq=45, checked=256)}
    srv = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setattr(probe, "VERIFY_PORT", srv.getsockname()[1])

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.sendall(json.dumps(answer).encode() + b"\n")

    threading.Thread(target=serve, daemon=True).start()
    yield answer
    srv.close()


def test_guest_verify_reads_the_one_line_answer(
    guest: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert probe.guest_verify("127.0.0.1", timeout=5) == guest
    assert probe.main(["verify", "127.0.0.1", "--timeout", "5"]) == 0
    assert json.loads(capsys.readouterr().out) == guest


def test_verify_command_reports_an_unreachable_guest(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    monkeypatch.setattr(probe, "VERIFY_PORT", port)  # nothing listens there any more
    assert probe.main(["verify", "127.0.0.1", "--timeout", "2"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["diskwrite"] is None and "ConnectionRefusedError" in out["error"]
