"""Where the CLI finds its server, token and CA: options, then environment, then the last lab's context."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vmshift.client import VmshiftClient
from vmshift.client.trust import ca_file_from_env
from vmshift.errors import InvalidInputError


@dataclass
class CliSettings:
    server: str | None = None
    token: str | None = None
    ca_file: Path | None = None


settings = CliSettings()


@dataclass(frozen=True)
class Target:
    server: str
    token: str
    ca_file: Path | None


def resolve() -> Target:
    server = settings.server or os.environ.get("VMSHIFT_SERVER")
    token = settings.token or os.environ.get("VMSHIFT_TOKEN")
    ca_file = settings.ca_file or ca_file_from_env()
    if not server or not token or ca_file is None:
        from vmshift.lab.context import load_context

        ctx = load_context() or {}
        from_context = not server or server == ctx.get("server")
        server = server or ctx.get("server")
        token = token or ctx.get("token")
        if ca_file is None and from_context and ctx.get("ca_file"):
            ca_file = Path(ctx["ca_file"])  # the lab's CA belongs to the lab's server only
    if not server or not token:
        raise InvalidInputError(
            "No vmshift server is configured.",
            hint="Pass --server, --token and --ca-file, set VMSHIFT_SERVER, VMSHIFT_TOKEN and "
            "VMSHIFT_CA_FILE, or run 'vmshift lab up'.",
        )
    return Target(str(server), str(token), ca_file)


def client() -> VmshiftClient:
    target = resolve()
    return VmshiftClient(target.server, target.token, ca_file=target.ca_file)
