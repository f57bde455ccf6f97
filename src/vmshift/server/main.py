"""``vmshift-server`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvicorn

from vmshift.errors import VmshiftError
from vmshift.server.settings import ServerSettings, read_token


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise VmshiftError(f"--listen {listen!r} is not HOST:PORT.", hint="Use e.g. 127.0.0.1:8100.")
    return host.strip("[]") or "127.0.0.1", int(port)


def build_settings(argv: list[str] | None = None) -> ServerSettings:
    p = argparse.ArgumentParser(
        prog="vmshift-server", description="vmshift control plane (inventory, tasks, API)"
    )
    p.add_argument("--listen", default="127.0.0.1:8100", help="HOST:PORT to serve the REST API on")
    p.add_argument("--state-dir", required=True, type=Path, help="directory for the server's state")
    p.add_argument("--token-file", required=True, type=Path, help="file holding the API bearer token")
    p.add_argument(
        "--db-url",
        default=None,
        help="SQLAlchemy URL (default: $VMSHIFT_DB_URL, else sqlite:///STATE_DIR/vmshift.db)",
    )
    p.add_argument("--heartbeat-interval", type=float, default=2.0, help="seconds between host polls")
    a = p.parse_args(argv)
    return ServerSettings(
        state_dir=a.state_dir,
        token=read_token(a.token_file, "token"),
        db_url=a.db_url,
        listen=a.listen,
        heartbeat_interval_s=a.heartbeat_interval,
    )


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
