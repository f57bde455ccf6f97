"""``ssl.SSLContext``s for each end: TLS 1.2+ only, the cluster CA as the only trust anchor."""

from __future__ import annotations

import ssl
from pathlib import Path


def server_context(cert: Path, key: Path, *, client_ca: Path | None = None,
                   require_client_cert: bool = False) -> ssl.SSLContext:
    """Serve with ``cert``; with ``client_ca``, verify client certificates against it (mutual TLS).

    The context may be reloaded in place (``load_cert_chain`` again): new handshakes use the new
    certificate, which is how an agent switches from its bootstrap certificate to the issued one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(ca: Path | None, *, cert: Path | None = None, key: Path | None = None,
                   check_hostname: bool = True) -> ssl.SSLContext:
    """Verify the peer against ``ca`` (None: trust nothing yet, see ``unverified_context``);
    present ``cert``/``key`` when given (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        ctx.load_verify_locations(cafile=str(ca))
    ctx.check_hostname = check_hostname
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def unverified_context(*, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """First contact with an agent whose certificate nobody has confirmed yet: the caller MUST compare
    the peer certificate's fingerprint with the one the operator confirmed before trusting anything."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    return ctx
