"""``vmshift-server`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import uvicorn

from vmshift.errors import VmshiftError
from vmshift.server import api_tls
from vmshift.server.options import BY_KEY, OptionValueError, parse_settings, read_config_file
from vmshift.server.settings import ServerSettings
from vmshift.tls import pki


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise VmshiftError(f"--listen {listen!r} is not HOST:PORT.", hint="Use e.g. 127.0.0.1:8100.")
    return host.strip("[]") or "127.0.0.1", int(port)


def build_settings(argv: list[str] | None = None) -> ServerSettings:
    return parse_settings(argv)


def run(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["ca"]:
        raise SystemExit(ca_command(args[1:]))
    if args[:1] == ["--config"] and args[2:3] == ["ca"]:  # vmshift-server --config FILE ca show
        raise SystemExit(ca_command([*args[3:], "--config", *args[1:2]]))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.umask(0o077)  # the database and every record: readable by root alone
    try:
        settings = build_settings(args)
        host, port = parse_listen(settings.listen)
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(settings.state_dir, 0o700)
        tls = api_tls.prepare(settings, host)
    except VmshiftError as e:
        print(f"vmshift-server: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    from vmshift.server.api.app import create_app

    # uvloop and httptools: the C event loop and HTTP parser (with asyncio's loop and h11 the cheapest
    # read cost twice the CPU: docs/scale.md). No access log: a line per API read at 200 reads/s
    # would be most of the log; tasks and events record what changes.
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", access_log=False,
                loop="uvloop", http="httptools", ssl_certfile=tls.cert, ssl_keyfile=tls.key)


def config_paths(config: Path | None, state_dir: Path | None,
                 ca_file: Path | None) -> tuple[Path, Path | None]:
    """The state dir and CA file from the flags, else from the config file."""
    values = read_config_file(config) if config is not None else {}
    try:
        state_dir = state_dir or (BY_KEY["state_dir"].parse(values["state_dir"])  # type: ignore[assignment]
                                  if "state_dir" in values else None)
        if ca_file is None and "ca_file" in values:
            ca_file = BY_KEY["ca_file"].parse(values["ca_file"])  # type: ignore[assignment]
    except OptionValueError as e:
        raise VmshiftError(f"The server config {config} is not valid: {e}.",
                           hint="See docs/deploy.md.") from e
    if state_dir is None:
        raise VmshiftError("'ca show' needs the server's state directory.",
                           hint="Pass --state-dir DIR or --config FILE.")
    return state_dir, ca_file


def ca_command(argv: list[str]) -> int:
    """``vmshift-server ca show``: the CA certificate clients trust, PEM on stdout."""
    p = argparse.ArgumentParser(prog="vmshift-server ca", description="the cluster CA clients trust")
    sub = p.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="print the CA certificate (PEM) and its fingerprint (stderr)")
    show.add_argument("--config", type=Path, default=None,
                      help="the server's config file (its state_dir, ca_file)")
    show.add_argument("--state-dir", type=Path, default=None, help="the server's --state-dir")
    show.add_argument("--ca-file", type=Path, default=None, help="the CA file the server was given, if any")
    show.add_argument("--fingerprint", action="store_true", help="print only the SHA-256 fingerprint")
    a = p.parse_args(argv)
    try:
        state_dir, ca_file = config_paths(a.config, a.state_dir, a.ca_file)
        pem = api_tls.client_ca(state_dir, ca_file).read_bytes()
        fingerprint = pki.fingerprint(pem)
    except VmshiftError as e:
        print(f"vmshift-server: {e}", file=sys.stderr)
        return 2
    if a.fingerprint:
        print(fingerprint)
    else:
        sys.stdout.write(pem.decode())
        print(f"fingerprint {fingerprint}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run()
