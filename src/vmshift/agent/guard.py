"""The agent's route guard: every request passes ``agent/access.decide`` with its TLS peer."""

from __future__ import annotations

import datetime as dt

from fastapi import Request
from starlette.routing import BaseRoute

from vmshift.agent.access import RouteCall, decide
from vmshift.model.agent_migration import PeerGrant
from vmshift.tls.peer import CAPABILITY_HEADER, peer_of


def _grants(request: Request) -> dict[int, PeerGrant]:
    roles = getattr(request.app.state, "migration", None)
    return roles.incoming.live_grants() if roles is not None else {}


async def require_allowed(request: Request) -> None:
    """FastAPI dependency of every agent route: 403 unless the caller's certificate may call it."""
    route: BaseRoute | None = request.scope.get("route")
    template = str(getattr(route, "path", request.url.path))
    raw_id = str(request.path_params.get("migration_id", ""))
    call = RouteCall(request.method, template, int(raw_id) if raw_id.isdigit() else None)
    refusal = decide(peer_of(request), call, request.headers.get(CAPABILITY_HEADER), _grants(request),
                     dt.datetime.now(dt.UTC))
    if refusal is not None:
        raise refusal
