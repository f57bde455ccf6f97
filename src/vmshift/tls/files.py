"""Where the cluster's certificates live on disk, written private (dirs 0700, keys 0600).

Server, ``STATE_DIR/tls/``: ``ca.pem`` (give it to clients and hosts), ``ca-key.pem``, ``server.pem`` and
``server-key.pem`` (serves the API and is the server's client identity towards agents).

Agent, ``STATE_DIR/tls/``: ``bootstrap.pem``/``bootstrap-key.pem`` (self-signed, made on first start),
then, once the server added the host, ``host.pem``/``host-key.pem`` (issued by the cluster CA) and
``ca.pem``. ``qemu/`` holds the same host identity under the file names QEMU's ``tls-creds-x509``
expects (see ``qemu_dir``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vmshift.tls import pki

DIR_MODE = 0o700
KEY_MODE = 0o600


def private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)
    return path


def write_private(path: Path, data: bytes, mode: int = KEY_MODE, *, fsync: bool = True) -> None:
    """Write atomically with ``mode`` from the first byte (never briefly world-readable);
    ``fsync`` off for records rewritten many times a second (a migration's progress)."""
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


@dataclass(frozen=True)
class ServerTlsFiles:
    dir: Path

    @classmethod
    def of(cls, state_dir: Path) -> ServerTlsFiles:
        return cls(state_dir / "tls")

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca-key.pem"

    @property
    def cert(self) -> Path:
        return self.dir / "server.pem"

    @property
    def key(self) -> Path:
        return self.dir / "server-key.pem"

    def ca(self) -> pki.KeyPair:
        return pki.KeyPair(self.ca_cert.read_bytes(), self.ca_key.read_bytes())

    def ensure(self, sans: list[str]) -> bool:
        """Create the CA and the server's certificate unless they exist; True when created now."""
        created = False
        if not self.ca_cert.exists():
            ca = pki.create_ca()
            write_private(self.ca_key, ca.key_pem)
            write_private(self.ca_cert, ca.cert_pem, 0o644)
            created = True
        if not self.cert.exists():
            pair = pki.issue_with_key(self.ca(), common_name=pki.SERVER_NAME, role=pki.Role.SERVER,
                                      sans=[pki.SERVER_NAME, "localhost", "127.0.0.1", "::1", *sans])
            write_private(self.key, pair.key_pem)
            write_private(self.cert, pair.cert_pem, 0o644)
            created = True
        return created


@dataclass(frozen=True)
class HostTlsFiles:
    dir: Path

    @classmethod
    def of(cls, state_dir: Path) -> HostTlsFiles:
        return cls(state_dir / "tls")

    @property
    def bootstrap_cert(self) -> Path:
        return self.dir / "bootstrap.pem"

    @property
    def bootstrap_key(self) -> Path:
        return self.dir / "bootstrap-key.pem"

    @property
    def cert(self) -> Path:
        return self.dir / "host.pem"

    @property
    def key(self) -> Path:
        return self.dir / "host-key.pem"

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def qemu_dir(self) -> Path:
        """For QEMU's ``tls-creds-x509 dir=``: ca-cert.pem, server-cert.pem/-key.pem and
        client-cert.pem/-key.pem (the host's one certificate serves both ends)."""
        return self.dir / "qemu"

    @property
    def enrolled(self) -> bool:
        return self.cert.exists() and self.key.exists() and self.ca_cert.exists()

    def ensure_bootstrap(self, common_name: str, sans: list[str]) -> None:
        if not self.bootstrap_cert.exists():
            pair = pki.self_signed(common_name, sans)
            write_private(self.bootstrap_key, pair.key_pem)
            write_private(self.bootstrap_cert, pair.cert_pem)

    def serving(self) -> tuple[Path, Path]:
        """(certificate, key) the agent serves with: the issued one once it has it."""
        if self.cert.exists() and self.key.exists():
            return self.cert, self.key
        return self.bootstrap_cert, self.bootstrap_key

    def install(self, cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> None:
        """Keep the certificate the cluster CA issued (checked by the caller), its key and the CA."""
        write_private(self.key, key_pem)
        write_private(self.ca_cert, ca_pem)
        write_private(self.cert, cert_pem)
