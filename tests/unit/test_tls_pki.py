"""The cluster CA issues certificates that name their holder's role and verify against it."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest

from vmshift.errors import InvalidInputError
from vmshift.tls import pki
from vmshift.tls.contexts import client_context, server_context
from vmshift.tls.files import HostTlsFiles, ServerTlsFiles


def test_issued_host_cert_names_role_and_addresses() -> None:
    ca = pki.create_ca()
    req = pki.make_key_and_csr("whatever-the-host-asks")
    cert = pki.issue(ca, req.cert_pem, common_name="host-1", role=pki.Role.HOST,
                     sans=["host-1", "10.0.0.1", "10.0.0.1"])
    got = pki.info(cert)
    assert got.common_name == "host-1"  # the CA names the holder, not the request
    assert got.role is pki.Role.HOST
    assert got.sans == ("10.0.0.1", "host-1")
    assert got.fingerprint == pki.fingerprint(cert)
    # GnuTLS order (what QEMU's authz-simple compares), not RFC 4514's reversed one
    assert pki.subject_dn(cert) == "O=vmshift,OU=vmshift-host,CN=host-1" == pki.subject_dn_of("host-1")


def test_fingerprint_forms() -> None:
    fp = pki.fingerprint(pki.self_signed("host-1", ["10.0.0.1"]).cert_pem)
    assert fp.startswith("SHA256:") and len(fp) == 7 + 64 + 31
    assert pki.normalise_fingerprint(fp.lower()) == fp
    assert pki.normalise_fingerprint(fp.removeprefix("SHA256:").replace(":", "")) == fp
    with pytest.raises(InvalidInputError):
        pki.normalise_fingerprint("SHA256:12:34")


def test_bad_csr_is_refused() -> None:
    with pytest.raises(InvalidInputError):
        pki.issue(pki.create_ca(), b"not a csr", common_name="h", role=pki.Role.HOST, sans=[])


def test_files_are_private(tmp_path: Path) -> None:
    files = ServerTlsFiles.of(tmp_path)
    assert files.ensure(["10.1.1.1"]) is True
    assert files.ensure(["10.1.1.1"]) is False
    assert stat.S_IMODE(files.dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(files.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    assert "10.1.1.1" in pki.info(files.cert.read_bytes()).sans
    host = HostTlsFiles.of(tmp_path / "agent")
    host.ensure_bootstrap("host-1", ["10.0.0.1"])
    assert host.serving() == (host.bootstrap_cert, host.bootstrap_key)
    assert not host.enrolled


def test_mutual_tls_handshake_with_issued_certs(tmp_path: Path) -> None:
    """A server-role client reaches a host-role server; both verify against the one CA."""
    files = ServerTlsFiles.of(tmp_path)
    files.ensure([])
    host = pki.issue_with_key(files.ca(), common_name="host-1", role=pki.Role.HOST, sans=["127.0.0.1"])
    (tmp_path / "h.pem").write_bytes(host.cert_pem)
    (tmp_path / "h-key.pem").write_bytes(host.key_pem)
    srv_ctx = server_context(tmp_path / "h.pem", tmp_path / "h-key.pem", client_ca=files.ca_cert,
                             require_client_cert=True)
    cli_ctx = client_context(files.ca_cert, cert=files.cert, key=files.key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: dict[str, object] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        with srv_ctx.wrap_socket(conn, server_side=True) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            seen["peer"] = pki.info_from_der(der)
            tls.sendall(b"ok")

    t = threading.Thread(target=serve)
    t.start()
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            cli_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.recv(2) == b"ok"
    t.join(5)
    listener.close()
    peer = seen["peer"]
    assert isinstance(peer, pki.CertInfo) and peer.role is pki.Role.SERVER
    # a client that trusts another CA refuses the host
    other = tmp_path / "other-ca.pem"
    other.write_bytes(pki.create_ca().cert_pem)
    with pytest.raises(ssl.SSLError):
        listener2 = socket.create_server(("127.0.0.1", 0))
        port2 = listener2.getsockname()[1]
        t2 = threading.Thread(target=lambda: _accept_quietly(listener2, srv_ctx))
        t2.start()
        try:
            with socket.create_connection(("127.0.0.1", port2)) as raw2:
                client_context(other).wrap_socket(raw2, server_hostname="127.0.0.1")
        finally:
            t2.join(5)
            listener2.close()


def _accept_quietly(listener: socket.socket, ctx: ssl.SSLContext) -> None:
    conn, _ = listener.accept()
    try:
        ctx.wrap_socket(conn, server_side=True).close()
    except (ssl.SSLError, OSError):
        conn.close()
