"""QMP helpers for an encrypted migration stream (QEMU 10.0.2: qapi/qom.json, qapi/migration.json).

QEMU encrypts a migration when its ``tls-creds`` parameter names a ``tls-creds-x509`` object: the
receiving QEMU holds one with ``endpoint=server``, the sending QEMU one with ``endpoint=client``,
both with ``verify-peer`` so each end checks the other's certificate against the CA. QEMU reads the
object's files (``dir``: ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
client-key.pem) once, when the object is added. On the receiving side ``tls-authz`` names an
``authz-simple`` object: only a client whose certificate's subject DN equals its ``identity`` may
send the stream (QEMU compares GnuTLS's RFC 4514 string of the DN). On the sending side
``tls-hostname`` is what the receiver's certificate must name (a SAN, else its CN).

The same parameters stay in force for every later migration of that QEMU, so they are reset to
``""`` (and the objects deleted) once a migration ends: a later plain migration must not try TLS.
"""

from __future__ import annotations

import contextlib
from enum import StrEnum
from pathlib import Path

from vmshift.errors import QemuError
from vmshift.qemu.qmp import QmpSession

CREDS_ID = "vmshift-migration-tls"
AUTHZ_ID = "vmshift-migration-authz"


class TlsEndpoint(StrEnum):
    SERVER = "server"  # the receiving QEMU (it listens)
    CLIENT = "client"  # the sending QEMU (it connects)


async def add_x509_creds(qmp: QmpSession, directory: Path, endpoint: TlsEndpoint,
                         obj_id: str = CREDS_ID) -> None:
    await qmp.execute("object-add", {"qom-type": "tls-creds-x509", "id": obj_id, "dir": str(directory),
                                     "endpoint": endpoint.value, "verify-peer": True})


async def add_authz_simple(qmp: QmpSession, identity: str, obj_id: str = AUTHZ_ID) -> None:
    await qmp.execute("object-add", {"qom-type": "authz-simple", "id": obj_id, "identity": identity})


async def delete_object(qmp: QmpSession, obj_id: str) -> None:
    await qmp.execute("object-del", {"id": obj_id})


async def set_migration_tls(qmp: QmpSession, *, creds: str = CREDS_ID, hostname: str | None = None,
                            authz: str | None = None) -> None:
    params: dict[str, str] = {"tls-creds": creds}
    if hostname is not None:
        params["tls-hostname"] = hostname
    if authz is not None:
        params["tls-authz"] = authz
    await qmp.execute("migrate-set-parameters", params)


async def clear_migration_tls(qmp: QmpSession) -> None:
    """Plain migrations from now on: reset the parameters, then delete the objects (either may be
    missing; a QEMU that never encrypted answers with nothing to do)."""
    await qmp.execute("migrate-set-parameters", {"tls-creds": "", "tls-hostname": "", "tls-authz": ""})
    for obj_id in (AUTHZ_ID, CREDS_ID):
        with contextlib.suppress(QemuError):
            await delete_object(qmp, obj_id)


async def tls_creds(qmp: QmpSession) -> str:
    """The ``tls-creds`` parameter in force ("" when the next migration is plain)."""
    reply = await qmp.execute("query-migrate-parameters")
    return str(reply.get("tls-creds") or "")
