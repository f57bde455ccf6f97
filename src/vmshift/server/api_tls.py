"""The certificate the server's API is served with, and the CA its clients trust.

On first start the server makes the cluster CA and its own certificate under ``STATE_DIR/tls/``
(``tls/files.py``); an operator may bring their own certificate and key instead (``--tls-cert``,
``--tls-key``), and names the CA that signed it with ``--ca-file`` so ``vmshift-server ca show``
hands clients the right one. Either way the files are checked here, before uvicorn starts, so a
wrong path or a key that does not belong to its certificate is one clear sentence, not a traceback.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from vmshift.errors import InvalidInputError
from vmshift.server.settings import ServerSettings
from vmshift.tls import pki
from vmshift.tls.contexts import server_context
from vmshift.tls.files import ServerTlsFiles

log = logging.getLogger(__name__)

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


@dataclass(frozen=True)
class ApiTls:
    cert: Path
    key: Path
    ca: Path | None  # None: an operator certificate whose CA was not named (clients use their own trust)


def certificate_names(listen_host: str) -> list[str]:
    """The names clients may reach the server by, besides localhost: the listen address, or for a
    wildcard listen address the machine's host names."""
    if listen_host in WILDCARD_HOSTS:
        return list(dict.fromkeys([socket.gethostname(), socket.getfqdn()]))
    return [listen_host]


def prepare(settings: ServerSettings, listen_host: str) -> ApiTls:
    """The API's certificate, key and CA: the operator's, else the server's own (made now if new)."""
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise InvalidInputError(
            "--tls-cert and --tls-key go together.",
            hint="Give both --tls-cert and --tls-key (your certificate and its key), or neither to let "
                 "vmshift-server make its own.",
        )
    if settings.tls_cert is not None and settings.tls_key is not None:
        tls = ApiTls(settings.tls_cert, settings.tls_key, settings.ca_file)
    else:
        files = ServerTlsFiles.of(settings.state_dir)
        names = certificate_names(listen_host)
        if files.ensure(names):
            log.info("Created the cluster CA and the server's certificate in %s (CA fingerprint %s); "
                     "give clients the CA with 'vmshift-server ca show'.",
                     files.dir, pki.fingerprint(files.ca_cert.read_bytes()))
        unnamed = [n for n in names if n not in pki.info(files.cert.read_bytes()).sans]
        if unnamed:
            log.warning("The server's certificate %s does not name %s, so clients that connect by that "
                        "name will refuse it; delete %s and %s and restart to get one from the same CA.",
                        files.cert, ", ".join(unnamed), files.cert, files.key)
        tls = ApiTls(files.cert, files.key, settings.ca_file or files.ca_cert)
    check(tls)
    return tls


def check(tls: ApiTls) -> None:
    """Refuse files that cannot be read, a key that is not the certificate's, a CA that did not sign it."""
    for what, path in (("certificate", tls.cert), ("key", tls.key), ("CA", tls.ca)):
        if path is not None and not path.is_file():
            raise InvalidInputError(f"The TLS {what} file {path} does not exist.",
                                    hint="Check the path, or leave the TLS options out to let "
                                         "vmshift-server make its own CA and certificate.")
    try:
        server_context(tls.cert, tls.key)
    except OSError as e:  # ssl.SSLError included
        raise InvalidInputError(
            f"The TLS certificate {tls.cert} and key {tls.key} cannot be used together: {e}.",
            hint="Give the PEM certificate and the unencrypted PEM key that belongs to it.",
        ) from e
    if tls.ca is not None and not signed_by(tls.cert.read_bytes(), tls.ca.read_bytes()):
        raise InvalidInputError(
            f"The TLS certificate {tls.cert} is not signed by the CA in {tls.ca}.",
            hint="Give --ca-file the CA that issued --tls-cert, with any intermediate certificates "
                 "(clients verify against it).",
        )


def signed_by(cert_pem: bytes, ca_pem: bytes) -> bool:
    """True when the first certificate of ``cert_pem`` was issued by one of the CAs in ``ca_pem``."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError as e:
        raise InvalidInputError(f"A TLS file is not PEM: {e}.",
                                hint="Give PEM files (-----BEGIN CERTIFICATE-----).") from e
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
            return True
        except (ValueError, TypeError, InvalidSignature):
            continue
    return False


def client_ca(state_dir: Path, ca_file: Path | None = None) -> Path:
    """The CA certificate file to give clients (``vmshift-server ca show``)."""
    path = ca_file or ServerTlsFiles.of(state_dir).ca_cert
    if not path.is_file():
        raise InvalidInputError(
            f"There is no CA certificate at {path}.",
            hint="Start vmshift-server once with this --state-dir (it makes the cluster CA), or pass "
                 "--ca-file with the CA that issued your own server certificate.",
        )
    return path
