"""``vmshift-agent --config FILE``: run the host agent (uvicorn) until SIGTERM/SIGINT.

Stopping the agent never stops VMs: QEMU runs in its own session and the next agent re-attaches.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import uvicorn

from vmshift.agent.app import create_app
from vmshift.agent.config import load_config
from vmshift.errors import VmshiftError


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vmshift-agent", description="vmshift host agent")
    parser.add_argument("--config", required=True, type=Path, help="agent config file (JSON)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    os.umask(0o077)  # every record, disk and log the agent (and its qemu-img) creates is 0600
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
        app = create_app(config)
    except VmshiftError as exc:
        print(f"vmshift-agent: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    uvicorn.run(app, host=config.listen_host, port=config.listen_port, log_level=args.log_level,
                access_log=False, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    run()
