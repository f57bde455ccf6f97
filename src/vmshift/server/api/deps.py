"""Shared route dependencies."""

from __future__ import annotations

from fastapi import Request

from vmshift.server.core import ServerCore


def core_of(request: Request) -> ServerCore:
    core: ServerCore = request.app.state.core
    return core
