"""Shared route dependencies."""

from __future__ import annotations

from fastapi import Request

from vmshift.server.core import ServerCore


async def core_of(request: Request) -> ServerCore:
    """``async`` only so that FastAPI does not send this attribute read to its thread pool."""
    core: ServerCore = request.app.state.core
    return core
