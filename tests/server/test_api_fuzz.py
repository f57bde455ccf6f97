"""Schemathesis against a real ``vmshift-server`` process: the OpenAPI document tells the truth.

Every operation but ``POST /hosts`` (a fuzzed address would make the server connect to hosts that are
not ours; test_input_rules.py tests it by hand) gets positive and negative cases with every check
Schemathesis has: no 5xx, only documented statuses, content types and headers, bodies that match the
response schemas, schema-valid requests accepted and schema-invalid ones refused, 401 without the
token, 405 with ``Allow``. The settings are in schemathesis.toml beside this file (docs/api.md).

``VMSHIFT_FUZZ_EXAMPLES`` (default 40) sets the cases per operation, ``VMSHIFT_FUZZ_SEED`` replays a run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from vmshift.tls.contexts import client_context
from vmshift.tls.files import ServerTlsFiles

BIN = Path(sys.executable).parent
CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES = int(os.environ.get("VMSHIFT_FUZZ_EXAMPLES", "40"))
RUN_TIMEOUT_S = 300
EXCLUDED = {("POST", "/api/v1/hosts")}

Server = tuple[str, str, Path]  # base URL (https://host:port), API token, the CA file the server made


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def real_server(tmp_path: Path) -> Iterator[Server]:
    """A ``vmshift-server`` process on loopback: SQLite in tmp_path, no hosts. The one place that knows
    how it is started, its scheme and what a client must trust."""
    state = tmp_path / "state"
    token = tmp_path / "token"
    token.write_text("fuzz-token\n")
    for f in (token,):
        f.chmod(0o600)
    port = _free_port()
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "vmshift-server"), "--listen", f"127.0.0.1:{port}", "--state-dir", str(state),
         "--token-file", str(token)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    # the CA the server makes at its first start; passed on to httpx and to Schemathesis (--tls-verify)
    base, ca = f"https://127.0.0.1:{port}", ServerTlsFiles.of(state).ca_cert
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                auth = {"Authorization": "Bearer fuzz-token"}
                if ca.exists() and httpx.get(f"{base}/api/v1/about", verify=client_context(ca), timeout=2,
                                             headers=auth).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "vmshift-server did not answer within 60 s"
            time.sleep(0.2)
        yield base, "fuzz-token", ca
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _operations(spec: dict[str, object]) -> set[tuple[str, str]]:
    paths = spec["paths"]
    assert isinstance(paths, dict)
    return {(method.upper(), path) for path, ops in paths.items() for method in ops}


def test_schemathesis_finds_nothing(real_server: Server) -> None:
    base, token, ca = real_server
    verify = client_context(ca)
    auth = {"Authorization": f"Bearer {token}"}
    spec = httpx.get(f"{base}/api/v1/openapi.json", verify=verify).json()
    operations = _operations(spec)
    assert operations >= EXCLUDED
    cmd = [str(BIN / "schemathesis"), "--config-file", str(CONFIG), "run", f"{base}/api/v1/openapi.json",
           "--header", f"Authorization: Bearer {token}", "--checks", "all", "--max-examples", str(EXAMPLES),
           "--workers", "1", "--generation-database", "none", "--no-color"]  # fmt: skip
    # one worker: with two threads, Hypothesis' ast.parse of its filter lambdas can raise CPython
    # 3.11's "AST constructor recursion depth mismatch" (a race on an interpreter-wide counter), and
    # that failed two runs of this session with nothing wrong in the API
    cmd += ["--tls-verify", str(ca)]
    if os.environ.get("VMSHIFT_FUZZ_SEED"):
        cmd += ["--seed", os.environ["VMSHIFT_FUZZ_SEED"]]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-20000:]
    # every operation but POST /hosts was tested, and none of them registered a host
    assert f"Selected: {len(operations) - len(EXCLUDED)}/{len(operations)}" in out, out[-3000:]
    assert f"Tested: {len(operations) - len(EXCLUDED)}" in out, out[-3000:]
    assert httpx.get(f"{base}/api/v1/hosts", headers=auth, verify=verify).json() == []
