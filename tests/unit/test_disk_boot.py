"""Disk boot (issue 10), pure parts: the cloud-init seed's files, the seed CD-ROM on QEMU's command
line, SSH key files, the lab-disk builder's sizes; and the agent making a VM's first disk from an
image (a relative overlay or a whole copy) and its seed ISO, with real qemu-img."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
from pathlib import Path

import pycdlib
import pytest

from tests.unit.test_qemu_cmdline import make_paths, make_spec, opt
from vmshift.agent.datastores import Datastores
from vmshift.agent.seed_iso import write_seed_iso
from vmshift.agent.vmfiles import VmFiles
from vmshift.cli.vms import read_ssh_keys
from vmshift.errors import InvalidInputError, NotFoundError
from vmshift.lab.disk_image import fat_size_mib, mformat_argv, syslinux_config
from vmshift.model.cloud_init import meta_data, network_config, seed_files, user_data
from vmshift.model.enums import Accelerator, BootKind
from vmshift.model.vm import BootSpec, DiskSpec, SeedSpec, VmSpec
from vmshift.qemu.cmdline import build_qemu_argv

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIUnitTestKey0000000000000000000000000000 a \"quoted\" comment"
SEED = SeedSpec(instance_id="0b7c5a4e-uuid", hostname="web-1", mac="52:54:00:aa:00:00",
                address="10.0.0.5/24", ssh_keys=[KEY])


def test_meta_data_names_the_instance_and_host() -> None:
    assert meta_data(SEED) == 'instance-id: "0b7c5a4e-uuid"\nlocal-hostname: "web-1"\n'


def test_network_config_is_v2_static_on_the_nic_with_the_mac() -> None:
    assert network_config(SEED).splitlines() == [
        "version: 2", "ethernets:", "  eth0:", "    match:", '      macaddress: "52:54:00:aa:00:00"',
        '    set-name: "eth0"', "    dhcp4: false", "    addresses:", '      - "10.0.0.5/24"',
    ]


def test_network_config_without_an_address_asks_dhcp() -> None:
    text = network_config(SEED.model_copy(update={"address": None, "mac": None}))
    assert "dhcp4: true" in text and "addresses" not in text and "match" not in text


def test_user_data_is_cloud_config_with_the_keys_quoted() -> None:
    text = user_data(SEED)
    assert text.startswith("#cloud-config\n")
    # a comment with quotes cannot break the YAML: the key is one JSON-escaped (YAML double-quoted) string
    assert f"  - {json.dumps(KEY)}" in text.splitlines()
    assert "ssh_authorized_keys" not in user_data(SEED.model_copy(update={"ssh_keys": []}))


def test_seed_iso_is_labelled_cidata_and_holds_the_three_files(tmp_path: Path) -> None:
    iso = tmp_path / "seed.iso"
    write_seed_iso(iso, SEED)
    reader = pycdlib.PyCdlib()
    reader.open(str(iso))
    try:
        assert reader.pvd.volume_identifier.decode().strip() == "cidata"
        for name, text in seed_files(SEED).items():
            out = io.BytesIO()
            reader.get_file_from_iso_fp(out, rr_path=f"/{name}")
            assert out.getvalue().decode() == text
    finally:
        reader.close()
    assert not list(tmp_path.glob("*.tmp"))


def test_seed_is_a_read_only_scsi_cd() -> None:
    spec = make_spec(boot=BootKind.DISK).model_copy(update={"seed": SEED})
    paths = make_paths(spec)
    argv = build_qemu_argv(spec, paths, accelerator=Accelerator.TCG, taps=["t0"])
    nodes = [json.loads(b) for b in opt(argv, "-blockdev")]
    seed_file = next(n for n in nodes if n.get("filename") == str(paths.seed_iso))
    assert seed_file["read-only"] is True and str(paths.seed_iso) == "/ds/shared-1/web-1/seed.iso"
    devices = [json.loads(d) if d.startswith("{") else {} for d in opt(argv, "-device")]
    cd = next(d for d in devices if d.get("driver") == "scsi-cd")
    assert cd["bus"] == "scsi0.0" and "bootindex" not in cd
    assert "scsi-cd" not in " ".join(build_qemu_argv(make_spec(boot=BootKind.DISK), paths,
                                                     accelerator=Accelerator.TCG, taps=["t0"]))


def test_qemu_accepts_disk_boot_with_seed(tmp_path: Path) -> None:
    spec = make_spec(boot=BootKind.DISK, disks=1, nics=0).model_copy(update={"seed": SEED})
    disk = tmp_path / "disk0.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    paths = make_paths(spec)
    paths = type(paths)(vm_dir=tmp_path, run_dir=tmp_path, disks=[disk])
    write_seed_iso(paths.seed_iso, SEED)
    argv = [*build_qemu_argv(spec, paths, accelerator=Accelerator.TCG, taps=[]), "-S", "-qmp", "stdio"]
    cmds = '{"execute":"qmp_capabilities"}\n{"execute":"query-block","id":"b"}\n{"execute":"quit"}\n'
    proc = subprocess.run(argv, input=cmds, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    replies = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    blocks = next(r["return"] for r in replies if r.get("id") == "b")
    cd = next(b for b in blocks if "seed0" in b["qdev"])
    assert cd["removable"] is True and cd["inserted"]["ro"] is True


def test_ssh_key_file_is_read_and_checked(tmp_path: Path) -> None:
    good = tmp_path / "id.pub"
    good.write_text(f"# my key\n{KEY}\n\n")
    assert read_ssh_keys(good) == [KEY]
    private = tmp_path / "id"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n")
    with pytest.raises(InvalidInputError, match="not a public key"):
        read_ssh_keys(private)
    empty = tmp_path / "empty.pub"
    empty.write_text("\n")
    with pytest.raises(InvalidInputError, match="holds no public key"):
        read_ssh_keys(empty)
    with pytest.raises(InvalidInputError, match="Cannot read"):
        read_ssh_keys(tmp_path / "missing.pub")


def test_lab_disk_sizes_and_config() -> None:
    assert fat_size_mib([7 << 20, (3 << 20) + 1]) == 11 + 4  # rounded up, plus room
    assert mformat_argv(Path("/x.raw"), 20)[:6] == ["mformat", "-i", "/x.raw", "-C", "-t", "20"]
    cfg = syslinux_config("console=ttyS0")
    assert "KERNEL /vmlinuz" in cfg and "INITRD /initrd.img" in cfg and "APPEND console=ttyS0" in cfg


# ----- the agent's VM files: real qemu-img on tmp_path ------------------------------------------

def _datastore(tmp_path: Path) -> tuple[VmFiles, Path]:
    ds = tmp_path / "shared-1"
    (ds / "images" / "base").mkdir(parents=True)
    (ds / ".vmshift-datastore.json").write_text(json.dumps({"uuid": "u-1", "name": "shared-1"}))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(ds / "images/base/disk.qcow2"), "20M"],
                   check=True)
    (ds / "images/base/image.json").write_text(json.dumps(
        {"name": "base", "kind": "disk", "disk": "disk.qcow2", "disk_size_mib": 20}))
    return VmFiles(Datastores([ds]), tmp_path / "state"), ds


def _spec(disk: DiskSpec) -> VmSpec:
    return VmSpec(name="web-1", uuid="u", cpus=1, memory_mib=64, cpu_model="max", machine_type="pc",
                  datastore="shared-1", disks=[disk], boot=BootSpec(kind=BootKind.DISK, image="base"),
                  seed=SEED)


def _info(path: Path) -> dict[str, object]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True,
                         text=True, check=True).stdout
    return dict(json.loads(out))


def test_linked_clone_is_a_relative_overlay_and_the_seed_is_written(tmp_path: Path) -> None:
    files, ds = _datastore(tmp_path)
    spec = _spec(DiskSpec(datastore="shared-1", file="disk0.qcow2", size_mib=32, backing_image="base"))
    asyncio.run(files.define(spec, {}))
    info = _info(ds / "web-1" / "disk0.qcow2")
    assert info["backing-filename"] == "../images/base/disk.qcow2"  # holds wherever the datastore is mounted
    assert info["virtual-size"] == 32 << 20
    assert (ds / "web-1" / "seed.iso").is_file()
    assert files.backing_files(spec) == [ds / "images/base/disk.qcow2"]
    (ds / "web-1" / "seed.iso").unlink()
    files.ensure_seed(spec)  # made again where it is missing (a moved VM)
    assert (ds / "web-1" / "seed.iso").is_file()


def test_full_clone_is_an_independent_copy(tmp_path: Path) -> None:
    files, ds = _datastore(tmp_path)
    spec = _spec(DiskSpec(datastore="shared-1", file="disk0.qcow2", size_mib=40, clone_of="base"))
    asyncio.run(files.define(spec, {}))
    info = _info(ds / "web-1" / "disk0.qcow2")
    assert "backing-filename" not in info and info["virtual-size"] == 40 << 20
    assert files.backing_files(spec) == []
    assert not list((ds / "web-1").glob(".*clone"))


@pytest.mark.parametrize(("disk", "error", "text"), [
    (DiskSpec(datastore="shared-1", file="disk0.qcow2", size_mib=32, backing_image="nope"),
     NotFoundError, "Image 'nope' is not on datastore"),
    (DiskSpec(datastore="shared-1", file="disk0.qcow2", size_mib=8, backing_image="base"),
     InvalidInputError, "smaller than image 'base'"),
])
def test_bad_image_disk_is_refused_before_anything_is_made(
    tmp_path: Path, disk: DiskSpec, error: type[Exception], text: str
) -> None:
    files, ds = _datastore(tmp_path)
    with pytest.raises(error, match=text):
        asyncio.run(files.define(_spec(disk), {}))
    assert not (ds / "web-1").exists()
