"""The server's API over HTTPS: clients verify it against the cluster CA, or refuse it saying how to
trust it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TOKEN, ServerHarness
from typer.testing import CliRunner

from vmshift.cli.main import app
from vmshift.client import VmshiftClient
from vmshift.errors import UntrustedPeerError
from vmshift.tls import pki


def test_the_sdk_verifies_the_server_against_the_ca(server: ServerHarness, tmp_path: Path) -> None:
    with VmshiftClient(server.url, TOKEN, ca_file=server.ca_file) as api:
        assert api.about()["database"] in ("sqlite", "postgresql")

    stranger = tmp_path / "stranger.pem"
    stranger.write_bytes(pki.create_ca("not this cluster").cert_pem)
    with VmshiftClient(server.url, TOKEN, ca_file=stranger) as api, \
            pytest.raises(UntrustedPeerError, match="does not verify against the CA in") as wrong:
        api.list_hosts()
    assert str(stranger) in wrong.value.message and "vmshift-server ca show" in (wrong.value.hint or "")

    with VmshiftClient(server.url, TOKEN) as api, \
            pytest.raises(UntrustedPeerError, match="system's trusted CAs") as none:
        api.metrics_text()
    assert "--ca-file" in (none.value.hint or "")


def test_the_cli_needs_the_ca(server: ServerHarness, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VMSHIFT_CA_FILE", raising=False)
    monkeypatch.setenv("VMSHIFT_CONFIG_DIR", str(tmp_path))  # no lab context to fall back on
    ok = CliRunner().invoke(app, [*server.cli_args(), "host", "list", "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout) == []

    without = CliRunner().invoke(app, ["--server", server.url, "--token", TOKEN, "host", "list"])
    assert without.exit_code != 0 and isinstance(without.exception, UntrustedPeerError)

    plain = CliRunner().invoke(app, ["--server", f"http://127.0.0.1:{server.port}", "--token", TOKEN,
                                     "--ca-file", str(server.ca_file), "host", "list"])
    assert plain.exit_code != 0 and "plain HTTP, which is not accepted" in str(plain.exception)
