"""``vmshift-server --config FILE`` as the systemd unit starts it: a real process, a real port."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
from conftest import wait_for

from vmshift.tls.contexts import client_context
from vmshift.tls.files import ServerTlsFiles

TOKEN = "config-file-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _server_bin() -> str:
    return str(Path(sys.executable).parent / "vmshift-server")


def _trust(state_dir: Path) -> ssl.SSLContext | None:
    """The CA the server makes in its state dir on first start (None: not there yet)."""
    files = ServerTlsFiles.of(state_dir)
    return client_context(files.ca_cert) if files.ca_cert.exists() else None


def test_the_server_runs_from_its_config_file_and_a_flag_overrides_it(tmp_path: Path, db_url: str) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    port = _free_port()
    config = tmp_path / "server.toml"
    config.write_text(f'''
listen = "127.0.0.1:1"
state_dir = "{tmp_path / 'state'}"
db_url = "{db_url}"
token_file = "{tmp_path / 'token'}"
event_retention_days = 90
''')
    env = {k: v for k, v in os.environ.items() if k != "VMSHIFT_DB_URL"}
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([_server_bin(), "--config", str(config), "--listen", f"127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        def about() -> dict[str, str] | None:
            assert proc.poll() is None, log.read_text()
            trust = _trust(tmp_path / "state")
            if trust is None:
                return None
            try:
                r = httpx.get(f"https://127.0.0.1:{port}/api/v1/about", verify=trust,
                              headers={"Authorization": f"Bearer {TOKEN}"}, timeout=2)
            except httpx.TransportError:
                return None
            body: dict[str, str] = r.json()
            return body

        body = wait_for(about, 30, "the server to answer on the port the flag named")
        assert body["database"] in ("sqlite", "postgresql")
        assert (tmp_path / "state").is_dir()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_config_with_an_unknown_key_stops_the_server_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('state_dir = "/tmp/x"\nheartbeat_interval = 5\n')
    r = subprocess.run([_server_bin(), "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert f"The server config {config} has an unknown key 'heartbeat_interval'." in r.stderr
    assert "heartbeat_interval_s" in r.stderr  # the hint lists the known keys
