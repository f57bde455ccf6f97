"""Issue 10, end to end: a VM boots from the lab-disk image by BIOS with its cloud-init seed, answers
`lab check` at the address the seed gave it, and live-migrates host-1 -> host-2 with its guest intact.
One VM for the whole file."""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pycdlib
import pytest

from tests.lab.helpers import LabHandle, guest_check, qemu_pids, vmshift, vmshift_json, wait_for
from tests.lab.vmotion import host_of_pid, layout, migrate
from vmshift.lab.lab import memtest_swept_since

pytestmark = pytest.mark.lab

VM = "diskboot"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDiskbootLabTestKeyOnlyForTheSeed0000000000 lab@vmshift"


def seed_file(iso: Path, name: str) -> str:
    reader = pycdlib.PyCdlib()
    reader.open(str(iso))
    try:
        out = io.BytesIO()
        reader.get_file_from_iso_fp(out, rr_path=f"/{name}")
        return out.getvalue().decode()
    finally:
        reader.close()


@pytest.fixture(scope="module")
def disk_vm(lab: LabHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    key_file = tmp_path_factory.mktemp("keys") / "id_ed25519.pub"
    key_file.write_text(KEY + "\n")
    vm = dict(vmshift_json(
        lab, "vm", "create", VM, "--host", "host-1", "--memory", "192", "--datastore", "shared-1",
        "--network", "VM Network", "--disk-image", "lab-disk", "--ssh-key", str(key_file), "--start",
    ))
    yield vm
    vmshift(lab, "vm", "stop", VM, check=False)
    vmshift(lab, "vm", "delete", VM, check=False)


def test_boots_from_disk_with_seed_and_moves_live(lab: LabHandle, disk_vm: dict[str, Any]) -> None:
    folder = layout(lab).shared_datastore / VM
    ip = disk_vm["ip"]
    assert ip, disk_vm
    before = guest_check(lab, VM)
    assert before["echo"] and before["memtest"]["enabled"], before

    # BIOS boot from an overlay of the image on the same datastore, no -kernel
    (pid,) = qemu_pids(disk_vm["uuid"])
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"-kernel" not in argv
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(folder / "disk0.qcow2")],
        capture_output=True, text=True, check=True).stdout)
    assert info["backing-filename"] == "../images/lab-disk/disk.qcow2"

    # the seed: the server's address as static config, the hostname, the SSH key
    assert f'- "{ip}/24"' in seed_file(folder / "seed.iso", "network-config")
    assert '"diskboot"' in seed_file(folder / "seed.iso", "meta-data")
    assert json.dumps(KEY) in seed_file(folder / "seed.iso", "user-data")
    serial = wait_for("the guest to report what its seed said",
                      lambda: s if "seed read" in (s := (folder / "serial.log").read_text(errors="replace"))
                      else None, timeout=60)
    assert f"seed read: vmshift.ip={ip}/24 vmshift.hostname={VM}" in serial

    m = migrate(lab, VM, "host-2")
    assert m["status"] == "completed", m.get("error")
    info_after = vmshift_json(lab, "vm", "show", VM)
    assert info_after["host"] == "host-2" and info_after["power_state"] == "poweredOn"
    assert info_after["ip"] == ip
    pids = qemu_pids(disk_vm["uuid"])
    assert len(pids) == 1 and host_of_pid(lab, pids[0]) == "host-2", pids
    start = guest_check(lab, VM)
    swept = memtest_swept_since
    after = wait_for("a full memtest sweep after the move",
                     lambda: c if swept(start["memtest"], (c := guest_check(lab, VM))["memtest"]) else None,
                     timeout=180)
    assert after["memtest"]["mismatches"] == 0, after
    assert after["uptime_s"] > before["uptime_s"], "the guest rebooted instead of moving"
    argv = Path(f"/proc/{pids[0]}/cmdline").read_bytes()
    assert b"scsi-cd" in argv and str(folder / "seed.iso").encode() in argv  # the seed moved with it


def test_image_import_converts_a_vmdk_and_refuses_a_truncated_file(
    lab: LabHandle, tmp_path: Path
) -> None:
    images = layout(lab).shared_datastore / "images"
    vmdk = tmp_path / "exported-disk.vmdk"
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", str(images / "lab-disk" / "disk.qcow2"), str(vmdk)],
                   check=True)
    done = vmshift_json(lab, "image", "import", str(vmdk), "--datastore", "shared-1")
    assert done["state"] == "success" and done["result"]["format"] == "vmdk", done
    meta = json.loads((images / "exported-disk" / "image.json").read_text())
    assert meta["kind"] == "disk" and meta["disk_size_mib"] == 20
    imported = images / "exported-disk" / "disk.qcow2"
    same = subprocess.run(["qemu-img", "compare", "-U", str(vmdk), str(imported)],
                          capture_output=True, text=True, check=False)
    assert same.returncode == 0, same.stdout + same.stderr

    truncated = tmp_path / "truncated.qcow2"
    truncated.write_bytes((images / "lab-disk" / "disk.qcow2").read_bytes()[:300_000])
    before = sorted(p.name for p in images.iterdir())
    bad = vmshift(lab, "image", "import", str(truncated), "--datastore", "shared-1", check=False)
    assert bad.returncode != 0
    said = " ".join(bad.stderr.split())  # the CLI wraps its message where the path's length puts it
    assert "is corrupt" in said and "Copy or download the file again" in said, bad.stderr
    assert sorted(p.name for p in images.iterdir()) == before  # nothing left behind
