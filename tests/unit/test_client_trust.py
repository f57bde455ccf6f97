"""How the CLI and SDK trust the server: https only, the CA from --ca-file, VMSHIFT_CA_FILE or the lab."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmshift.cli import context as cli_context
from vmshift.client import VmshiftClient
from vmshift.client.trust import check_url, server_trust
from vmshift.errors import InvalidInputError
from vmshift.lab import context as lab_context
from vmshift.tls import pki


@pytest.fixture
def clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No server, token or CA from the environment; the CLI context lives in tmp_path."""
    for var in ("VMSHIFT_SERVER", "VMSHIFT_TOKEN", "VMSHIFT_CA_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("VMSHIFT_CONFIG_DIR", str(tmp_path))
    monkeypatch.setattr(cli_context, "settings", cli_context.CliSettings())
    return tmp_path


def test_plain_http_is_refused_with_how_to_trust_the_ca() -> None:
    with pytest.raises(InvalidInputError, match="plain HTTP, which is not accepted") as info:
        check_url("http://10.0.0.5:8100")
    hint = info.value.hint or ""
    assert "https://10.0.0.5:8100" in hint and "--ca-file" in hint and "VMSHIFT_CA_FILE" in hint
    assert "vmshift-server ca show" in hint
    with pytest.raises(InvalidInputError, match="plain HTTP"):
        VmshiftClient("http://127.0.0.1:8100", "t")
    with pytest.raises(InvalidInputError, match="not an https:// URL"):
        VmshiftClient("127.0.0.1:8100", "t")
    check_url("HTTPS://127.0.0.1:8100")


def test_a_missing_or_wrong_ca_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="does not exist") as missing:
        server_trust(tmp_path / "nope.pem")
    assert "vmshift-server ca show" in (missing.value.hint or "")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(InvalidInputError, match="holds no PEM certificate"):
        VmshiftClient("https://127.0.0.1:8100", "t", ca_file=junk)
    unreadable = tmp_path / "dir.pem"
    unreadable.mkdir()
    with pytest.raises(InvalidInputError, match="cannot be read"):
        server_trust(unreadable)


def test_sdk_takes_the_ca_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.create_ca().cert_pem)
    monkeypatch.setenv("VMSHIFT_CA_FILE", str(ca))
    with VmshiftClient("https://127.0.0.1:8100", "t") as c:
        assert c.ca_file == ca
    with VmshiftClient("https://127.0.0.1:8100", "t", ca_file=str(tmp_path / "ca.pem")) as c:
        assert c.ca_file == ca


def test_cli_ca_comes_from_option_then_environment_then_the_lab(clean: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    lab_context.save_context("https://127.0.0.1:4000", "labtok", "lab", "/labs/lab/ca.pem")
    target = cli_context.resolve()
    assert (target.server, target.token, target.ca_file) == ("https://127.0.0.1:4000", "labtok",
                                                             Path("/labs/lab/ca.pem"))
    monkeypatch.setenv("VMSHIFT_CA_FILE", "/env/ca.pem")
    assert cli_context.resolve().ca_file == Path("/env/ca.pem")
    cli_context.settings.ca_file = Path("/opt/ca.pem")
    assert cli_context.resolve().ca_file == Path("/opt/ca.pem")


def test_the_lab_ca_is_not_used_for_another_server(clean: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lab_context.save_context("https://127.0.0.1:4000", "labtok", "lab", "/labs/lab/ca.pem")
    monkeypatch.setenv("VMSHIFT_SERVER", "https://vmshift.example:8100")
    monkeypatch.setenv("VMSHIFT_TOKEN", "prod")
    assert cli_context.resolve().ca_file is None  # the system's CAs, never the lab's


def test_no_server_names_every_way_to_configure_one(clean: Path) -> None:
    with pytest.raises(InvalidInputError, match="No vmshift server is configured") as info:
        cli_context.resolve()
    assert "--ca-file" in (info.value.hint or "") and "VMSHIFT_CA_FILE" in (info.value.hint or "")
