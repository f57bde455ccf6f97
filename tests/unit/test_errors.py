"""Which errors say a retry can help, and which say the object is not there."""

from __future__ import annotations

import httpx
import pytest

from vmshift.errors import (
    ApiError,
    AuthError,
    CapacityError,
    ConflictError,
    HostUnreachableError,
    IncomingFailedError,
    InvalidInputError,
    NotFoundError,
    QemuError,
    VmshiftError,
)


def test_only_an_unreachable_host_is_retryable_among_local_errors() -> None:
    assert HostUnreachableError("no answer").retryable
    for cls in (VmshiftError, InvalidInputError, AuthError, NotFoundError, ConflictError,
                IncomingFailedError, CapacityError, QemuError):
        assert not cls("x").retryable, cls.__name__


def test_not_found_is_set_by_the_not_found_error_only() -> None:
    assert NotFoundError("no VM web1").not_found
    assert not ConflictError("busy").not_found
    assert not HostUnreachableError("no answer").not_found


@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [
        (502, "api_error", True),
        (503, "api_error", True),
        (504, "api_error", True),
        (502, "bad_agent_answer", True),
        (502, "host_unreachable", True),
        (500, "host_unreachable", True),  # a server relaying that the host behind it did not answer
        (500, "internal", False),
        (400, "invalid_input", False),
        (401, "unauthorized", False),
        (404, "not_found", False),
        (409, "incoming_failed", False),
        (422, "insufficient_capacity", False),
    ],
)
def test_api_error_retryable_follows_the_remote_status_and_code(
    status: int, code: str, retryable: bool
) -> None:
    assert ApiError("remote said no", status=status, code=code).retryable is retryable


@pytest.mark.parametrize(
    ("status", "code", "not_found"),
    [(404, "not_found", True), (404, "api_error", True), (405, "method_not_allowed", False),
     (409, "conflict", False), (503, "api_error", False)],
)
def test_api_error_not_found(status: int, code: str, not_found: bool) -> None:
    assert ApiError("remote said no", status=status, code=code).not_found is not_found


def test_from_response_classifies_the_body() -> None:
    body = {"error": {"code": "host_unreachable", "message": "Host h2 did not answer.", "hint": "Check h2."}}
    err = ApiError.from_response(httpx.Response(502, json=body), "fallback")
    assert (err.status, err.code, err.hint) == (502, "host_unreachable", "Check h2.")
    assert err.message == "Host h2 did not answer."
    assert err.retryable and not err.not_found


def test_from_response_without_a_body_uses_the_status() -> None:
    assert ApiError.from_response(httpx.Response(503, text="<html>busy</html>"), "busy").retryable
    gone = ApiError.from_response(httpx.Response(404), "gone")
    assert gone.not_found and not gone.retryable and gone.message == "gone"


def test_errors_keep_their_classification_through_raise() -> None:
    with pytest.raises(VmshiftError) as info:
        raise ApiError("down", status=504)
    assert info.value.retryable
