"""The server's HTTPS: its options, the CA and certificate it makes on first start, `ca show`."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from vmshift.errors import InvalidInputError
from vmshift.server import api_tls
from vmshift.server.main import build_settings, ca_command
from vmshift.server.settings import ServerSettings
from vmshift.tls import pki
from vmshift.tls.files import ServerTlsFiles


def settings(tmp_path: Path, **kw: object) -> ServerSettings:
    return ServerSettings(state_dir=tmp_path / "state", token="t", **kw)  # type: ignore[arg-type]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_tls_options_are_settings_fields(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("t\n")
    base = ["--state-dir", str(tmp_path), "--token-file", str(tmp_path / "tok")]
    plain = build_settings(base)
    assert (plain.tls_cert, plain.tls_key, plain.ca_file) == (None, None, None)
    given = build_settings([*base, "--tls-cert", "/etc/c.pem", "--tls-key", "/etc/k.pem",
                            "--ca-file", "/etc/ca.pem"])
    assert (given.tls_cert, given.tls_key, given.ca_file) == (Path("/etc/c.pem"), Path("/etc/k.pem"),
                                                              Path("/etc/ca.pem"))


def test_first_start_makes_the_ca_and_a_certificate_for_the_listen_address(tmp_path: Path) -> None:
    s = settings(tmp_path)
    tls = api_tls.prepare(s, "10.0.0.5")
    files = ServerTlsFiles.of(s.state_dir)
    assert (tls.cert, tls.key, tls.ca) == (files.cert, files.key, files.ca_cert)
    cert = pki.info(files.cert.read_bytes())
    assert cert.role is pki.Role.SERVER
    assert {"10.0.0.5", "127.0.0.1", "localhost"} <= set(cert.sans)
    assert api_tls.signed_by(files.cert.read_bytes(), files.ca_cert.read_bytes())
    assert files.key.stat().st_mode & 0o777 == 0o600 and files.dir.stat().st_mode & 0o777 == 0o700
    ca_before = files.ca_cert.read_bytes()
    api_tls.prepare(s, "10.0.0.5")  # a restart keeps the CA clients already trust
    assert files.ca_cert.read_bytes() == ca_before


def test_a_new_listen_address_the_certificate_lacks_is_reported(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    s = settings(tmp_path)
    api_tls.prepare(s, "10.0.0.5")
    api_tls.prepare(s, "10.0.0.6")
    assert "does not name 10.0.0.6" in caplog.text and "server-key.pem" in caplog.text


def test_a_wildcard_listen_address_names_the_machine() -> None:
    assert socket.gethostname() in api_tls.certificate_names("0.0.0.0")
    assert api_tls.certificate_names("::") == api_tls.certificate_names("0.0.0.0")
    assert api_tls.certificate_names("srv.example") == ["srv.example"]


def test_operator_certificate_is_served_and_checked(tmp_path: Path) -> None:
    ca = pki.create_ca("operator CA")
    pair = pki.issue_with_key(ca, common_name="srv", role=pki.Role.SERVER, sans=["srv"])
    cert, key = write(tmp_path / "c.pem", pair.cert_pem), write(tmp_path / "k.pem", pair.key_pem)
    ca_file = write(tmp_path / "ca.pem", ca.cert_pem)
    tls = api_tls.prepare(settings(tmp_path, tls_cert=cert, tls_key=key, ca_file=ca_file), "srv")
    assert (tls.cert, tls.key, tls.ca) == (cert, key, ca_file)
    assert not ServerTlsFiles.of(tmp_path / "state").cert.exists()  # nothing of its own was made

    with pytest.raises(InvalidInputError, match="go together") as half:
        api_tls.prepare(settings(tmp_path, tls_cert=cert), "srv")
    assert "--tls-key" in (half.value.hint or "")

    other = write(tmp_path / "other-key.pem", pki.issue_with_key(ca, common_name="x", role=pki.Role.SERVER,
                                                                 sans=["x"]).key_pem)
    with pytest.raises(InvalidInputError, match="cannot be used together"):
        api_tls.prepare(settings(tmp_path, tls_cert=cert, tls_key=other), "srv")

    stranger = write(tmp_path / "stranger.pem", pki.create_ca("someone else").cert_pem)
    with pytest.raises(InvalidInputError, match="is not signed by the CA") as unsigned:
        api_tls.prepare(settings(tmp_path, tls_cert=cert, tls_key=key, ca_file=stranger), "srv")
    assert "--ca-file" in (unsigned.value.hint or "")

    with pytest.raises(InvalidInputError, match="does not exist"):
        api_tls.prepare(settings(tmp_path, tls_cert=tmp_path / "nope.pem", tls_key=key), "srv")


def test_ca_show_prints_the_ca_and_its_fingerprint(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    s = settings(tmp_path)
    api_tls.prepare(s, "127.0.0.1")
    ca_pem = ServerTlsFiles.of(s.state_dir).ca_cert.read_bytes()
    assert ca_command(["show", "--state-dir", str(s.state_dir)]) == 0
    out = capsys.readouterr()
    assert out.out.encode() == ca_pem and pki.fingerprint(ca_pem) in out.err
    assert ca_command(["show", "--state-dir", str(s.state_dir), "--fingerprint"]) == 0
    assert capsys.readouterr().out.strip() == pki.fingerprint(ca_pem)


def test_ca_show_without_a_ca_says_how_to_get_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ca_command(["show", "--state-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "There is no CA certificate at" in err and "Start vmshift-server once" in err
