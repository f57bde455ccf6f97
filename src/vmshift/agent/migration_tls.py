"""An encrypted migration stream, on this host's side (docs/encrypted-vmotion.md, "How QEMU encrypts").

A request that carries ``tls`` (``MigrationTls``) makes this host's QEMU speak TLS with the host's
cluster certificate (``tls/files.py`` ``HostTlsFiles``): the target's QEMU accepts the stream only
from the source host named in ``tls.peer`` (``authz-simple`` on the peer's subject DN), the source's
QEMU accepts only a target whose certificate carries the migration address it connects to.

QEMU reads its credentials from a directory under its own file names (``HostTlsFiles.qemu_dir``),
written here from the host's issued files before each encrypted migration (so a rotated certificate
takes effect with the next one). QEMU opens them itself, maybe as an unprivileged user: the files
become the QEMU process owner's, and that user alone is given search permission on the private
directories above (a POSIX ACL entry; their mode stays owner-only for everyone else).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from vmshift.errors import ConflictError, QemuError, VmshiftError
from vmshift.model.agent_migration import MigrationTls
from vmshift.qemu import tls_qmp
from vmshift.qemu.qmp import QmpSession
from vmshift.qemu.tls_qmp import TlsEndpoint
from vmshift.tls import pki
from vmshift.tls.files import HostTlsFiles, private_dir, write_private

log = logging.getLogger(__name__)
CERT_MODE = 0o600  # owned by QEMU's user: nobody else needs to read them
KEY_MODE = 0o600
#: QEMU's tls-creds-x509 file names (docs/system/tls.rst); the host's one certificate is both ends.
QEMU_CA = "ca-cert.pem"
QEMU_CERTS = ("server-cert.pem", "client-cert.pem")
QEMU_KEYS = ("server-key.pem", "client-key.pem")


def require_enrolled(files: HostTlsFiles) -> None:
    """Refuse an encrypted migration before anything starts when this host has no certificate."""
    if not files.enrolled:
        raise ConflictError(
            f"This host has no cluster certificate ({files.cert} is missing), so it cannot encrypt a "
            "migration.",
            hint="Add the host to the server ('vmshift host add ADDRESS') so the server issues it one, "
                 "or migrate with --encryption disabled.")


@dataclass(frozen=True)
class QemuOwner:
    """Who a QEMU process runs as (it opens the credential files itself)."""

    uid: int
    gid: int

    @classmethod
    def of(cls, pid: int) -> QemuOwner:
        try:
            proc = psutil.Process(pid)
            return cls(uid=proc.uids().effective, gid=proc.gids().effective)
        except psutil.Error as exc:
            raise QemuError(f"The owner of QEMU process {pid} cannot be read: {exc}.",
                            hint="Check that the VM's QEMU still runs.") from exc


def prepare_qemu_dir(files: HostTlsFiles, owner: QemuOwner) -> Path:
    """Write ``qemu_dir`` from the host's issued files, readable by ``owner`` only (keys 0600)."""
    require_enrolled(files)
    directory = private_dir(files.qemu_dir)
    cert, key, ca = files.cert.read_bytes(), files.key.read_bytes(), files.ca_cert.read_bytes()
    written = [(QEMU_CA, ca, CERT_MODE)]
    written += [(name, cert, CERT_MODE) for name in QEMU_CERTS]
    written += [(name, key, KEY_MODE) for name in QEMU_KEYS]
    for name, data, mode in written:
        path = directory / name
        write_private(path, data, mode)
        os.chown(path, owner.uid, owner.gid)
    os.chown(directory, owner.uid, owner.gid)
    if owner.uid != os.geteuid():
        # the state dir and its tls/ are private (0700), and so may be a directory above them (a
        # parent made by a process with umask 077, e.g. /run/vmshift of the lab's hosts): QEMU's
        # user may pass through each, not list it
        for parent in reversed(files.dir.parents[:-1]):
            if parent.stat().st_mode & 0o001 == 0:
                grant_search(parent, owner.uid)
        if files.dir.stat().st_mode & 0o001 == 0:
            grant_search(files.dir, owner.uid)
    return directory


# POSIX ACL xattr (linux/posix_acl_xattr.h): version 2, then (tag, perm, id) entries sorted by tag.
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_NO_ID = 0xFFFFFFFF
_SEARCH = 0o1


def grant_search(directory: Path, uid: int) -> None:
    """Let ``uid`` (and nobody else) pass through ``directory``: an ACL entry ``user:UID:--x``.

    The owner and other bits stay as they are; the group class shows the ACL's mask (``--x``), which
    grants the owning group nothing (its own entry keeps the mode's group bits). Re-applied before
    each encrypted migration: a later ``chmod`` of the directory resets the mask.
    """
    mode = directory.stat().st_mode
    entries = [(_ACL_USER_OBJ, (mode >> 6) & 0o7, _NO_ID), (_ACL_USER, _SEARCH, uid),
               (_ACL_GROUP_OBJ, (mode >> 3) & 0o7, _NO_ID),
               (_ACL_MASK, ((mode >> 3) & 0o7) | _SEARCH, _NO_ID), (_ACL_OTHER, mode & 0o7, _NO_ID)]
    data = struct.pack("<I", _ACL_VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(directory, _ACL_XATTR, data)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
            raise ConflictError(
                f"QEMU runs as uid {uid} but {directory} is private and its file system has no POSIX "
                "ACLs, so QEMU cannot read the host's certificate.",
                hint="Put the agent's state_dir on a file system with ACLs (ext4, xfs, tmpfs).") from exc
        raise


def peer_identity(tls: MigrationTls) -> str:
    """The subject DN the source host's certificate carries (the target's ``authz-simple``)."""
    return pki.subject_dn_of(tls.peer, pki.Role.HOST)


def uri_host(uri: str) -> str:
    """The address in ``tcp:ADDRESS:PORT`` (IPv6 in brackets): what the target's certificate names."""
    host = urlsplit("//" + uri.split(":", 1)[1]).hostname if ":" in uri else None
    if not host:
        raise ConflictError(f"The migration URI {uri!r} names no address.",
                            hint="The server builds it as tcp:ADDRESS:PORT.")
    return host


async def setup_target(qmp: QmpSession, files: HostTlsFiles, pid: int, tls: MigrationTls) -> None:
    """Before ``migrate-incoming``: accept the stream over TLS from ``tls.peer`` only."""
    directory = prepare_qemu_dir(files, QemuOwner.of(pid))
    await tls_qmp.clear_migration_tls(qmp)  # leftovers of an earlier migration of this QEMU
    await tls_qmp.add_x509_creds(qmp, directory, TlsEndpoint.SERVER)
    await tls_qmp.add_authz_simple(qmp, peer_identity(tls))
    await tls_qmp.set_migration_tls(qmp, authz=tls_qmp.AUTHZ_ID)


async def setup_source(qmp: QmpSession, files: HostTlsFiles, pid: int, uri: str) -> None:
    """Before ``migrate``: send over TLS to a target whose certificate names ``uri``'s address."""
    directory = prepare_qemu_dir(files, QemuOwner.of(pid))
    await tls_qmp.clear_migration_tls(qmp)
    await tls_qmp.add_x509_creds(qmp, directory, TlsEndpoint.CLIENT)
    await tls_qmp.set_migration_tls(qmp, hostname=uri_host(uri))


async def encrypted(qmp: QmpSession) -> bool:
    """Does this QEMU's migration run over TLS? (QEMU's own ``tls-creds`` parameter.)"""
    return bool(await tls_qmp.tls_creds(qmp))


async def teardown(qmp: QmpSession, migration_id: int) -> None:
    """After the migration ended on a QEMU that keeps running: the next migration is plain again."""
    with contextlib.suppress(VmshiftError):
        if not await encrypted(qmp):
            return
    try:
        await tls_qmp.clear_migration_tls(qmp)
    except VmshiftError as exc:
        log.warning("migration %d: resetting QEMU's migration TLS failed: %s", migration_id, exc)
