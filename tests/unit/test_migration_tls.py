"""The host side of an encrypted migration (agent/migration_tls.py): QEMU's credential files, who may
read them, the target's peer identity and the address the source checks."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmshift.agent import migration_tls
from vmshift.agent.migration_tls import QemuOwner
from vmshift.errors import ConflictError
from vmshift.model.agent_migration import MigrationTls
from vmshift.tls import pki
from vmshift.tls.files import HostTlsFiles, private_dir, write_private

NOBODY = 65534
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="chown and reading as another user need root")


def enroll(state_dir: Path, name: str = "host-1") -> HostTlsFiles:
    files = HostTlsFiles.of(private_dir(state_dir))
    ca = pki.create_ca()
    req = pki.make_key_and_csr(name)
    write_private(files.key, req.key_pem)
    write_private(files.cert, pki.issue(ca, req.cert_pem, common_name=name, role=pki.Role.HOST,
                                        sans=[name, "10.0.1.1"]), 0o644)
    write_private(files.ca_cert, ca.cert_pem, 0o644)
    return files


def reads_as(uid: int, path: Path) -> bool:
    """Can ``uid`` (with no groups) read ``path``? Asked of a child process running as that user."""
    proc = subprocess.run(["cat", str(path)], user=uid, group=uid, extra_groups=[], cwd="/",
                          capture_output=True, timeout=30)
    return proc.returncode == 0


def test_a_host_without_certificate_refuses_with_a_way_out(tmp_path: Path) -> None:
    with pytest.raises(ConflictError, match="no cluster certificate") as err:
        migration_tls.require_enrolled(HostTlsFiles.of(tmp_path))
    assert err.value.status == 409 and "vmshift host add" in (err.value.hint or "")


def test_the_target_accepts_the_source_hosts_dn_as_gnutls_writes_it(tmp_path: Path) -> None:
    files = enroll(tmp_path, "host-7")
    assert migration_tls.peer_identity(MigrationTls(peer="host-7")) == pki.subject_dn(files.cert.read_bytes())
    assert migration_tls.peer_identity(MigrationTls(peer="host-7")) == "O=vmshift,OU=vmshift-host,CN=host-7"


@pytest.mark.parametrize(("uri", "host"), [("tcp:10.0.1.2:49152", "10.0.1.2"),
                                           ("tcp:[fd00::2]:49152", "fd00::2"),
                                           ("tcp:mig.host-2:4000", "mig.host-2")])
def test_the_source_checks_the_address_it_connects_to(uri: str, host: str) -> None:
    assert migration_tls.uri_host(uri) == host


def test_a_uri_without_address_is_refused() -> None:
    with pytest.raises(ConflictError, match="names no address"):
        migration_tls.uri_host("tcp::4000")


def test_qemus_files_are_the_hosts_own_under_qemus_names(tmp_path: Path) -> None:
    files = enroll(tmp_path / "state")
    directory = migration_tls.prepare_qemu_dir(files, QemuOwner(os.geteuid(), os.getegid()))
    assert directory == files.qemu_dir and directory.stat().st_mode & 0o777 == 0o700
    cert, key = files.cert.read_bytes(), files.key.read_bytes()
    for name in ("server-cert.pem", "client-cert.pem"):
        assert (directory / name).read_bytes() == cert
    for name in ("server-key.pem", "client-key.pem"):
        assert (directory / name).read_bytes() == key and (directory / name).stat().st_mode & 0o777 == 0o600
    assert (directory / "ca-cert.pem").read_bytes() == files.ca_cert.read_bytes()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may pass through (pytest's tmp_path is under a private one)."""
    path = Path(tempfile.mkdtemp(prefix="vmshift-tls-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


@root_only
def test_an_unprivileged_qemu_reads_its_files_and_nobody_else_does(open_dir: Path) -> None:
    files = enroll(open_dir / "state")
    directory = migration_tls.prepare_qemu_dir(files, QemuOwner(NOBODY, NOBODY))
    key = directory / "server-key.pem"
    assert key.stat().st_uid == NOBODY and key.stat().st_mode & 0o777 == 0o600
    assert reads_as(NOBODY, key), "QEMU's user must pass the private state dir and tls/"
    assert not reads_as(NOBODY, files.key), "the host's own key stays root's"
    assert not reads_as(NOBODY - 1, key), "another user may not even pass"
    for private in (files.dir.parent, files.dir):
        assert private.stat().st_mode & 0o007 == 0, "no permission for others"


@root_only
def test_a_private_directory_above_the_state_dir_is_passed_too(open_dir: Path) -> None:
    """/run/vmshift made 0700 (by a process with umask 077) holds every lab host's state dir."""
    above = open_dir / "run-vmshift"
    above.mkdir(mode=0o700)
    os.chmod(above, 0o700)
    files = enroll(above / "state")
    directory = migration_tls.prepare_qemu_dir(files, QemuOwner(NOBODY, NOBODY))
    assert reads_as(NOBODY, directory / "server-key.pem")
    assert above.stat().st_mode & 0o007 == 0, "still nothing for others"
    assert not reads_as(NOBODY - 1, directory / "server-key.pem")
