"""The HTTP edge shared by the server's and the agents' APIs: bearer auth and error bodies.

Both APIs answer every failure with `{"error": {"code", "message", "hint"}}` (docs/design/contracts.md):
a `VmshiftError` keeps its status and code, request validation becomes one readable sentence that names
the field (400 for malformed JSON, else 422), and anything unexpected becomes a 500 without a traceback.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vmshift.errors import AuthError, VmshiftError

log = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str, hint: str | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"code": code, "message": message, "hint": hint}}
    )


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def validation_message(exc: RequestValidationError) -> tuple[int, str]:
    """One readable sentence naming the (first) offending field; 400 for malformed JSON, else 422."""
    errors = list(exc.errors())
    if not errors:
        return 422, "The request is not valid."
    first = errors[0]
    more = f" ({len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "syntax error")
        return 400, f"The request body is not valid JSON: {detail}."
    field = _field_name(tuple(first.get("loc", ())))
    if first.get("type") == "missing":
        return 422, f"Field '{field}' is required{more}."
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ").rstrip(".")
    return 422, f"Field '{field}' is invalid: {msg}{more}."


def bearer_auth(token: str, *, hint_missing: str, hint_wrong: str) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that accepts only `Authorization: Bearer <token>`."""

    async def require_token(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise AuthError("The request has no bearer token.", hint=hint_missing)
        if not secrets.compare_digest(given.strip().encode(), token.encode()):
            raise AuthError("The bearer token is wrong.", hint=hint_wrong)

    return require_token


def install_error_handlers(app: FastAPI, *, what: str, api_doc_hint: str) -> None:
    """Error bodies for VmshiftError, validation, unknown routes and unexpected failures."""

    @app.exception_handler(VmshiftError)
    async def _vmshift(_req: Request, exc: VmshiftError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.hint)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = validation_message(exc)
        return error_response(status, "invalid_input", message, "Fix the request body and send it again.")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = "No such API endpoint." if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, code, message, api_doc_hint)

    @app.exception_handler(Exception)
    async def _internal(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in the %s API", what)
        return error_response(
            500, "internal", f"The {what} failed: {type(exc).__name__}.", f"See the {what}'s log for details."
        )
