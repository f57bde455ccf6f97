"""``vmshift-server`` command line: options from ``--config FILE`` and flags (server/options.py)."""

from __future__ import annotations

import logging
import sys

import uvicorn

from vmshift.errors import VmshiftError
from vmshift.server.options import parse_settings
from vmshift.server.settings import ServerSettings


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise VmshiftError(f"--listen {listen!r} is not HOST:PORT.", hint="Use e.g. 127.0.0.1:8100.")
    return host.strip("[]") or "127.0.0.1", int(port)


def build_settings(argv: list[str] | None = None) -> ServerSettings:
    return parse_settings(argv)


def run(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = build_settings(argv)
        host, port = parse_listen(settings.listen)
    except VmshiftError as e:
        print(f"vmshift-server: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    from vmshift.server.api.app import create_app

    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


if __name__ == "__main__":
    run()
