"""How a client trusts the vmshift server: HTTPS only, verified against the cluster CA.

The CA comes from ``ca_file`` (the CLI's ``--ca-file``), else ``$VMSHIFT_CA_FILE``; without one the
system's trusted CAs are used (a server certificate from a public CA). Every failure is one sentence
that says how to trust the CA, because the fix is always on the client's side.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from vmshift.errors import InvalidInputError, UntrustedPeerError
from vmshift.tls.contexts import client_context

CA_FILE_ENV = "VMSHIFT_CA_FILE"
HOW_TO_TRUST = ("trust the cluster CA with --ca-file or VMSHIFT_CA_FILE (ca_file= in the SDK); "
                "get it on the server with `vmshift-server ca show --state-dir DIR`.")


def ca_file_from_env() -> Path | None:
    value = os.environ.get(CA_FILE_ENV)
    return Path(value).expanduser() if value else None


def check_url(server: str) -> None:
    """Refuse anything but an ``https://`` URL (a bearer token must never travel in clear)."""
    scheme, sep, _ = server.partition("://")
    if sep and scheme.lower() == "https":
        return
    if sep and scheme.lower() == "http":
        raise InvalidInputError(
            f"The server URL {server} uses plain HTTP, which is not accepted.",
            hint=f"Use https://{server.partition('://')[2]} and {HOW_TO_TRUST}",
        )
    raise InvalidInputError(f"The server URL {server!r} is not an https:// URL.",
                            hint="Give it as https://HOST:PORT, e.g. https://127.0.0.1:8100.")


def server_trust(ca_file: Path | None) -> ssl.SSLContext:
    """The SSL context that verifies the server: against ``ca_file``, else the system's CAs."""
    if ca_file is None:
        ctx = ssl.create_default_context()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx
    try:
        return client_context(ca_file)
    except FileNotFoundError as e:
        raise InvalidInputError(f"The CA file {ca_file} does not exist.",
                                hint=f"Check the path, or {HOW_TO_TRUST}") from e
    except ssl.SSLError as e:  # before OSError, its base class
        raise InvalidInputError(f"The CA file {ca_file} holds no PEM certificate.",
                                hint="Give the CA certificate (PEM) itself: get it on the server with "
                                     "`vmshift-server ca show --state-dir DIR`.") from e
    except OSError as e:
        raise InvalidInputError(f"The CA file {ca_file} cannot be read: {e.strerror}.",
                                hint=f"Check its permissions, or {HOW_TO_TRUST}") from e


def verify_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error somewhere in ``exc``'s causes, if that is what failed."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ssl.SSLCertVerificationError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def untrusted(server: str, ca_file: Path | None, err: ssl.SSLCertVerificationError) -> UntrustedPeerError:
    against = f"the CA in {ca_file}" if ca_file is not None else "the system's trusted CAs (no CA file given)"
    reason = err.verify_message or err.reason or "verification failed"
    return UntrustedPeerError(
        f"The vmshift server at {server} presented a certificate that does not verify against {against} "
        f"({reason}).",
        hint=f"If this is your server, {HOW_TO_TRUST}",
    )
