"""Where the CLI finds its server and token: options, then environment, then the last lab's context."""

from __future__ import annotations

import os
from dataclasses import dataclass

from vmshift.client import VmshiftClient
from vmshift.errors import InvalidInputError


@dataclass
class CliSettings:
    server: str | None = None
    token: str | None = None


settings = CliSettings()


def resolve() -> tuple[str, str]:
    server = settings.server or os.environ.get("VMSHIFT_SERVER")
    token = settings.token or os.environ.get("VMSHIFT_TOKEN")
    if not server or not token:
        from vmshift.lab.context import load_context

        ctx = load_context() or {}
        server = server or ctx.get("server")
        token = token or ctx.get("token")
    if not server or not token:
        raise InvalidInputError(
            "No vmshift server is configured.",
            hint="Pass --server and --token, set VMSHIFT_SERVER and VMSHIFT_TOKEN, or run 'vmshift lab up'.",
        )
    return str(server), str(token)


def client() -> VmshiftClient:
    server, token = resolve()
    return VmshiftClient(server, token)
