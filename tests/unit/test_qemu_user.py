"""Who QEMU runs as, the files prepared for it, and the agent config keys that choose them."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmshift.agent.config import DEFAULT_QEMU_USER, DEFAULT_SERIAL_LOG_CAP_BYTES, config_from_dict
from vmshift.agent.qemu_user import QemuIdentity, prepare_vm_files, resolve, unreachable
from vmshift.errors import ConflictError, InvalidInputError
from vmshift.model.enums import Accelerator
from vmshift.qemu.cmdline import KernelBoot, VmPaths

BASE = {"name": "h", "listen": "127.0.0.1:1", "ca_file": "/ca.pem", "state_dir": "/s"}
NOBODY_UID = 65534


def test_config_defaults_and_keys() -> None:
    config = config_from_dict(BASE)
    assert config.qemu_user == DEFAULT_QEMU_USER == "vmshift-qemu"
    assert config.serial_log_cap_bytes == DEFAULT_SERIAL_LOG_CAP_BYTES == 4 << 20
    config = config_from_dict({**BASE, "qemu_user": "", "serial_log_cap_bytes": 1 << 20})
    assert config.qemu_user == "" and config.serial_log_cap_bytes == 1 << 20


@pytest.mark.parametrize("bad", [{"qemu_user": 5}, {"serial_log_cap_bytes": 100},
                                 {"serial_log_cap_bytes": "4M"}, {"serial_log_cap_bytes": True}])
def test_config_refuses_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidInputError, match=next(iter(bad))):
        config_from_dict({**BASE, **bad})


def test_missing_user_means_root_with_a_reason() -> None:
    identity = resolve("no-such-user-vmshift", Accelerator.TCG, grant_devices=False)
    assert not identity.confined and identity.popen_kwargs() == {}
    assert "does not exist" in identity.why_root and "useradd --system" in identity.why_root
    assert not resolve("", Accelerator.TCG).confined
    assert "is root" in resolve("root", Accelerator.TCG, grant_devices=False).why_root


def test_existing_user_is_used() -> None:
    identity = resolve("nobody", Accelerator.TCG, grant_devices=False)  # leave /dev/userfaultfd alone
    assert identity.confined and identity.uid == NOBODY_UID
    assert identity.popen_kwargs()["user"] == NOBODY_UID


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A folder other users may pass through (pytest's own tmp_path is under a 0700 folder)."""
    path = Path(tempfile.mkdtemp(prefix="vmshift-qemu-user-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def nobody() -> QemuIdentity:
    return QemuIdentity(user="nobody", uid=NOBODY_UID, gid=NOBODY_UID)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_prepare_makes_disks_qemus_and_folders_root_s(open_tmp: Path) -> None:
    tmp_path = open_tmp
    ds = tmp_path / "ds"
    vm_dir = ds / "vm"
    vm_dir.mkdir(parents=True)
    os.chmod(ds, 0o755)
    disk, state = vm_dir / "disk0.qcow2", vm_dir / "suspended.state"
    disk.write_bytes(b"x")
    state.write_bytes(b"y")
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    os.chmod(kernel, 0o644)
    paths = VmPaths(vm_dir=vm_dir, run_dir=tmp_path / "run", disks=[disk])
    assert unreachable(nobody(), vm_dir) is None
    prepare_vm_files(nobody(), paths, KernelBoot(kernel=kernel))
    for f in (disk, state):
        st = f.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY_UID, NOBODY_UID, 0o600)
    st = vm_dir.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, NOBODY_UID, 0o710)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_prepare_refuses_a_folder_qemu_cannot_pass(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    vm_dir = closed / "ds" / "vm"
    vm_dir.mkdir(parents=True)
    os.chmod(closed, 0o700)
    with pytest.raises(ConflictError, match="cannot pass through") as err:
        prepare_vm_files(nobody(), VmPaths(vm_dir=vm_dir, run_dir=tmp_path / "run"), None)
    assert "qemu_user" in (err.value.hint or "")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_root_identity_only_tightens_modes(tmp_path: Path) -> None:
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    disk = vm_dir / "d.raw"
    disk.write_bytes(b"")
    prepare_vm_files(QemuIdentity(), VmPaths(vm_dir=vm_dir, run_dir=tmp_path, disks=[disk]), None)
    assert stat.S_IMODE(vm_dir.stat().st_mode) == 0o700 and stat.S_IMODE(disk.stat().st_mode) == 0o600
    assert disk.stat().st_uid == 0
