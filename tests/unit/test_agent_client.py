"""The agent client against a recording httpx MockTransport: paths, bodies, timeouts, answers, errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from vmshift.client.agent import AgentClient, AgentCredentials
from vmshift.errors import ApiError, HostUnreachableError
from vmshift.model.enums import PowerState
from vmshift.tls.peer import CAPABILITY_HEADER

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A mock agent: answers with ``handler`` and keeps every request it saw."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)


def make_client(handler: Handler, **kwargs: Any) -> tuple[AgentClient, Recorder]:
    rec = Recorder(handler)
    creds = AgentCredentials(None, {CAPABILITY_HEADER: "s3cret"})
    client = AgentClient("10.0.0.2:8301", creds, transport=httpx.MockTransport(rec), **kwargs)
    return client, rec


def progress_body(migration_id: int, status: str = "completed", phase: str = "completed") -> dict[str, Any]:
    return {"migration_id": migration_id, "vm": "web1", "phase": phase, "status": status}


async def test_migration_activate_posts_and_parses_the_runtime() -> None:
    runtime = {"name": "web1", "uuid": "u-1", "power_state": "poweredOn", "qemu_status": "running"}
    client, rec = make_client(lambda r: httpx.Response(200, json=runtime))
    try:
        vm = await client.migration_activate(7, timeout_s=12.5)
    finally:
        await client.aclose()
    assert vm.power_state is PowerState.POWERED_ON and vm.qemu_status == "running"
    (req,) = rec.requests
    assert (req.method, req.url.path) == ("POST", "/api/v1/migrations/7/activate")
    assert req.headers[CAPABILITY_HEADER] == "s3cret" and "authorization" not in req.headers
    assert req.extensions["timeout"]["read"] == 12.5
    assert req.extensions["timeout"]["connect"] == 3.0


async def test_migration_incoming_state_reads_the_target_proof() -> None:
    body = {
        "migration_id": 7,
        "vm": "web1",
        "state": "incoming",
        "qemu_alive": True,
        "qemu_status": "inmigrate",
        "stream": "completed",
        "timeline": {"target_loaded": 12.25},
    }
    client, rec = make_client(lambda r: httpx.Response(200, json=body))
    try:
        state = await client.migration_incoming_state(7)
    finally:
        await client.aclose()
    assert (rec.requests[0].method, rec.requests[0].url.path) == ("GET", "/api/v1/migrations/7/incoming")
    assert state.qemu_alive and state.qemu_status == "inmigrate" and state.stream == "completed"
    assert state.model_dump(exclude_none=True)["timeline"] == {"target_loaded": 12.25}


async def test_incoming_state_defaults_when_qemu_is_gone() -> None:
    body = {"migration_id": 3, "vm": "web1", "state": "failed", "qemu_alive": False}
    client, _ = make_client(lambda r: httpx.Response(200, json=body))
    try:
        state = await client.migration_incoming_state(3)
    finally:
        await client.aclose()
    assert (state.qemu_status, state.stream) == (None, None)
    assert state.model_dump(exclude_none=True)["timeline"] == {}


async def test_migration_finalize_sends_the_body() -> None:
    client, rec = make_client(lambda r: httpx.Response(200, json=progress_body(9)))
    try:
        progress = await client.migration_finalize(9, {"force": True})
    finally:
        await client.aclose()
    (req,) = rec.requests
    assert (req.method, req.url.path) == ("POST", "/api/v1/migrations/9/finalize")
    assert json.loads(req.content) == {"force": True}
    assert progress.migration_id == 9 and progress.status == "completed"


async def test_an_error_body_keeps_the_agent_code_and_says_no_retry() -> None:
    error = {"error": {"code": "incoming_failed", "message": "The stream did not load.", "hint": None}}
    client, _ = make_client(lambda r: httpx.Response(409, json=error))
    try:
        with pytest.raises(ApiError) as info:
            await client.migration_activate(7, timeout_s=5)
    finally:
        await client.aclose()
    assert (info.value.status, info.value.code) == (409, "incoming_failed")
    assert not info.value.retryable and not info.value.not_found


async def test_a_busy_agent_is_worth_a_retry() -> None:
    client, _ = make_client(lambda r: httpx.Response(503, text="overloaded"))
    try:
        with pytest.raises(ApiError) as info:
            await client.migration_incoming_state(7)
    finally:
        await client.aclose()
    assert info.value.retryable


async def test_an_unknown_migration_is_not_found() -> None:
    error = {"error": {"code": "not_found", "message": "No migration 7 here.", "hint": None}}
    client, _ = make_client(lambda r: httpx.Response(404, json=error))
    try:
        with pytest.raises(ApiError) as info:
            await client.migration_incoming_state(7)
    finally:
        await client.aclose()
    assert info.value.not_found and not info.value.retryable


async def test_a_refused_connection_is_host_unreachable_and_retryable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client, _ = make_client(refuse)
    try:
        with pytest.raises(HostUnreachableError) as info:
            await client.migration_activate(7, timeout_s=5)
    finally:
        await client.aclose()
    assert info.value.retryable


async def test_a_garbled_answer_is_bad_agent_answer() -> None:
    client, _ = make_client(lambda r: httpx.Response(200, json={"nonsense": 1}))
    try:
        with pytest.raises(ApiError) as info:
            await client.migration_incoming_state(7)
    finally:
        await client.aclose()
    assert info.value.code == "bad_agent_answer"


async def test_short_connect_timeout_and_no_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("ALL_PROXY", "http://proxy.invalid:3128")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    client, rec = make_client(
        lambda r: httpx.Response(200, json={"name": "h2", "time": 1.0}), timeout_s=10.0, connect_timeout_s=0.5
    )
    try:
        await client.health()
        await client.health(timeout_s=2.0)
    finally:
        await client.aclose()
    assert [r.extensions["timeout"]["connect"] for r in rec.requests] == [0.5, 0.5]
    assert rec.requests[0].extensions["timeout"]["read"] == 10.0
    assert rec.requests[1].extensions["timeout"]["read"] == 2.0
    assert rec.requests[0].url.host == "10.0.0.2"  # reached the mock, not a proxy built from the variables
    assert not client._http.trust_env
    assert "close" not in rec.requests[0].headers.get("connection", "")


async def test_migration_rollback_takes_a_shorter_timeout() -> None:
    client, rec = make_client(lambda r: httpx.Response(200, json={"rolled_back": 4}))
    try:
        await client.migration_rollback(4, timeout_s=10.0)
        await client.migration_rollback(4)
    finally:
        await client.aclose()
    assert [(r.method, r.url.path) for r in rec.requests] == [("DELETE", "/api/v1/migrations/4")] * 2
    assert [r.extensions["timeout"]["read"] for r in rec.requests] == [10.0, 60]
