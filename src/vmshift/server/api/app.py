"""FastAPI application factory: lifespan (core start/stop), bearer auth, error bodies, routes."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException

from vmshift.errors import AuthError, ConflictError, VmshiftError
from vmshift.server.api import routes_inventory, routes_migrations, routes_tasks, routes_vms
from vmshift.server.core import ServerCore
from vmshift.server.metrics import render_metrics
from vmshift.server.settings import ServerSettings

API_PREFIX = "/api/v1"
log = logging.getLogger("vmshift.server.api")


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


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(VmshiftError)
    async def _vmshift(_req: Request, exc: VmshiftError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.hint)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = validation_message(exc)
        return error_response(status, "invalid_input", message, "Fix the request body and send it again.")

    @app.exception_handler(IntegrityError)
    async def _integrity(_req: Request, exc: IntegrityError) -> JSONResponse:
        err = ConflictError(
            "The change clashes with an object that was created meanwhile.",
            hint="Reload the inventory and try again.",
        )
        return error_response(err.status, err.code, err.message, err.hint)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = "No such API endpoint." if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, code, message, "See docs/design/contracts.md for the API.")

    @app.exception_handler(Exception)
    async def _internal(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(
            500, "internal", f"The server failed: {type(exc).__name__}.", "See the server log for details."
        )


def create_app(settings: ServerSettings) -> FastAPI:
    """The REST API of one server. The inventory opens (and the heartbeat starts) in the lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        core = ServerCore.open(settings)
        app.state.core = core
        core.start()
        try:
            yield
        finally:
            await core.close()

    async def require_token(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthError(
                "The request has no bearer token.",
                hint="Send 'Authorization: Bearer <token>' with the server's token.",
            )
        if not secrets.compare_digest(token.strip().encode(), settings.token.encode()):
            raise AuthError(
                "The bearer token is wrong.", hint="Use the content of the server's --token-file."
            )

    app = FastAPI(
        title="vmshift server",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=f"{API_PREFIX}/openapi.json",
    )
    _install_error_handlers(app)
    deps = [Depends(require_token)]
    for module in (routes_inventory, routes_vms, routes_tasks, routes_migrations):
        app.include_router(module.router, prefix=API_PREFIX, dependencies=deps)

    @app.get("/metrics", dependencies=deps, response_class=PlainTextResponse)
    async def metrics(request: Request) -> PlainTextResponse:
        """Prometheus text format; the same bearer token as the API (set it in the scrape config)."""
        core: ServerCore = request.app.state.core
        with core.sessions() as s:
            text = render_metrics(s)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
