"""``vmshift-server`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvicorn

from vmshift.errors import VmshiftError
from vmshift.server import api_tls
from vmshift.server.settings import ServerSettings, read_token
from vmshift.tls import pki


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise VmshiftError(f"--listen {listen!r} is not HOST:PORT.", hint="Use e.g. 127.0.0.1:8100.")
    return host.strip("[]") or "127.0.0.1", int(port)


def build_settings(argv: list[str] | None = None) -> ServerSettings:
    p = argparse.ArgumentParser(
        prog="vmshift-server", description="vmshift control plane (inventory, tasks, API over HTTPS)",
        epilog="'vmshift-server ca show --state-dir DIR' prints the CA clients trust (docs/tls.md).",
    )
    p.add_argument("--listen", default="127.0.0.1:8100", help="HOST:PORT to serve the REST API on")
    p.add_argument("--state-dir", required=True, type=Path, help="directory for the server's state")
    p.add_argument("--token-file", required=True, type=Path, help="file holding the API bearer token")
    p.add_argument(
        "--agent-token-file", required=True, type=Path, help="file holding the token agents accept"
    )
    p.add_argument(
        "--db-url",
        default=None,
        help="SQLAlchemy URL (default: $VMSHIFT_DB_URL, else sqlite:///STATE_DIR/vmshift.db)",
    )
    p.add_argument("--heartbeat-interval", type=float, default=2.0, help="seconds between host polls")
    p.add_argument("--tls-cert", type=Path, default=None,
                   help="PEM certificate to serve the API with "
                   "(default: STATE_DIR/tls/server.pem, made on first start)")
    p.add_argument("--tls-key", type=Path, default=None, help="the private key of --tls-cert")
    p.add_argument("--ca-file", type=Path, default=None,
                   help="the CA that issued --tls-cert, which 'ca show' prints "
                   "(default: STATE_DIR/tls/ca.pem)")
    a = p.parse_args(argv)
    return ServerSettings(
        state_dir=a.state_dir,
        token=read_token(a.token_file, "token"),
        agent_token=read_token(a.agent_token_file, "agent token"),
        db_url=a.db_url,
        listen=a.listen,
        heartbeat_interval_s=a.heartbeat_interval,
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
        ca_file=a.ca_file,
    )


def run(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["ca"]:
        raise SystemExit(ca_command(args[1:]))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = build_settings(args)
        host, port = parse_listen(settings.listen)
        tls = api_tls.prepare(settings, host)
    except VmshiftError as e:
        print(f"vmshift-server: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    from vmshift.server.api.app import create_app

    uvicorn.run(create_app(settings), host=host, port=port, log_level="info",
                ssl_certfile=tls.cert, ssl_keyfile=tls.key)


def ca_command(argv: list[str]) -> int:
    """``vmshift-server ca show``: the CA certificate clients trust, PEM on stdout."""
    p = argparse.ArgumentParser(prog="vmshift-server ca", description="the cluster CA clients trust")
    sub = p.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="print the CA certificate (PEM) and its fingerprint (stderr)")
    show.add_argument("--state-dir", type=Path, required=True, help="the server's --state-dir")
    show.add_argument("--ca-file", type=Path, default=None, help="the CA file the server was given, if any")
    show.add_argument("--fingerprint", action="store_true", help="print only the SHA-256 fingerprint")
    a = p.parse_args(argv)
    try:
        pem = api_tls.client_ca(a.state_dir, a.ca_file).read_bytes()
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
