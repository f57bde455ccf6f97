"""``vmshift-agent --config FILE [fingerprint]``: run the host agent (HTTPS, mutual TLS) until
SIGTERM/SIGINT, or print the fingerprint of the certificate it serves (to confirm on ``host add``).

Stopping the agent never stops VMs: QEMU runs in its own session and the next agent re-attaches.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from vmshift.agent.app import create_app, end_streams
from vmshift.agent.config import load_config
from vmshift.agent.tls_server import AgentTls, serve
from vmshift.errors import VmshiftError


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vmshift-agent", description="vmshift host agent")
    parser.add_argument("--config", required=True, type=Path, help="agent config file (JSON)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("command", nargs="?", choices=["serve", "fingerprint"], default="serve",
                        help="serve (default) or print the fingerprint of the certificate it serves")
    args = parser.parse_args(argv)
    os.umask(0o077)  # every record, disk and log the agent (and its qemu-img) creates is 0600
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
        tls = AgentTls(config)
        if args.command == "fingerprint":
            print(tls.fingerprint())
            return
        tls.context()  # fails early on a missing CA file
        app = create_app(config, tls)
    except VmshiftError as exc:
        print(f"vmshift-agent: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    serve(app, config, tls, args.log_level, lambda: end_streams(app))


if __name__ == "__main__":
    run()
