"""FastAPI application factory: lifespan (core start/stop), bearer auth, error bodies, routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy.exc import IntegrityError

from vmshift.errors import ConflictError
from vmshift.http_edge import bearer_auth, error_response, install_error_handlers
from vmshift.server.api import (
    routes_drs,
    routes_images,
    routes_inventory,
    routes_maintenance,
    routes_migrations,
    routes_rules,
    routes_schedules,
    routes_tasks,
    routes_vms,
)
from vmshift.server.api.openapi import COMMON, COMMON_TEXT_ROUTE
from vmshift.server.core import ServerCore
from vmshift.server.metrics import render_metrics
from vmshift.server.settings import ServerSettings

API_PREFIX = "/api/v1"
log = logging.getLogger("vmshift.server.api")


def _install_error_handlers(app: FastAPI) -> None:
    install_error_handlers(app, what="server", api_doc_hint="See docs/design/contracts.md for the API.")

    @app.exception_handler(IntegrityError)
    async def _integrity(_req: Request, exc: IntegrityError) -> JSONResponse:
        err = ConflictError(
            "The change clashes with an object that was created meanwhile.",
            hint="Reload the inventory and try again.",
        )
        return error_response(err.status, err.code, err.message, err.hint)


def create_app(settings: ServerSettings) -> FastAPI:
    """The REST API of one server. The inventory opens (and the heartbeat starts) in the lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # the thread pool of the plain-def routes (and run_in_threadpool): bounded below the
        # connection pool, so a burst of requests queues here rather than for a connection
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_db_threads
        core = ServerCore.open(settings)
        app.state.core = core
        core.start()
        try:
            yield
        finally:
            await core.close()

    require_token = bearer_auth(
        settings.token,
        hint_missing="Send 'Authorization: Bearer <token>' with the server's token.",
        hint_wrong="Use the content of the server's --token-file.",
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
    for module in (routes_inventory, routes_vms, routes_tasks, routes_migrations, routes_schedules,
                   routes_images, routes_rules, routes_maintenance, routes_drs):
        app.include_router(module.router, prefix=API_PREFIX, dependencies=deps, responses=COMMON)

    @app.get("/metrics", dependencies=deps, response_class=PlainTextResponse, responses=COMMON_TEXT_ROUTE)
    def metrics(request: Request) -> PlainTextResponse:
        """Prometheus text format; the same bearer token as the API (set it in the scrape config).
        A plain ``def``: its queries run in the thread pool, not on the event loop."""
        core: ServerCore = request.app.state.core
        with core.sessions() as s:
            text = render_metrics(s)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
