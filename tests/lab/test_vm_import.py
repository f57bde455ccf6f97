"""Issue 10, import: an OVA made here (qemu-img's streamOptimized VMDK of the lab-disk image plus an OVF
written here) and a libvirt domain XML made by `virt-install --print-xml` against libvirt's test driver
are imported with `vm import-ova` / `vm import-libvirt`, and both VMs boot and answer `lab check`.
Bad input (a truncated OVA, an OVA without an OVF, a damaged disk, a disk of an unknown type) is
refused with a clear error and leaves no image and no VM. Two VMs, booted side by side."""

from __future__ import annotations

import json
import subprocess
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.helpers import LabHandle, guest_check, qemu_pids, vmshift, vmshift_json
from tests.lab.vmotion import layout

pytestmark = pytest.mark.lab

OVA_VM, LIBVIRT_VM = "imp-ova", "imp-libvirt"
MAC = "52:54:00:1a:be:11"

OVF = """<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References><File ovf:id="file1" ovf:href="{disk}"/></References>
  <DiskSection><Info>Virtual disks</Info>
    <Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="{capacity}"
      ovf:capacityAllocationUnits="byte"
      ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection><Info>Networks</Info><Network ovf:name="Corp LAN"><Description>LAN</Description></Network>
  </NetworkSection>
  <VirtualSystem ovf:id="exported-vm"><Info>A VM exported elsewhere</Info><Name>exported vm</Name>
    <VirtualHardwareSection><Info>Hardware</Info>
      <Item><rasd:ElementName>2 virtual CPUs</rasd:ElementName><rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:ElementName>192MB</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>192</rasd:VirtualQuantity></Item>
      <Item><rasd:ElementName>SCSI controller 0</rasd:ElementName><rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType><rasd:ResourceType>6</rasd:ResourceType></Item>
      <Item><rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>Corp LAN</rasd:Connection>
        <rasd:ElementName>Network adapter 1</rasd:ElementName><rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceType>10</rasd:ResourceType></Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def qemu_img_info(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True,
                         text=True, check=True).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def make_ova(out: Path, vmdk: Path | None, *, with_ovf: bool = True) -> Path:
    """A tar with the descriptor first (as DSP0243 asks) and the disk after it."""
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        if with_ovf and vmdk is not None:
            size = qemu_img_info(vmdk)["virtual-size"]
            ovf = out.with_suffix(".ovf")
            ovf.write_text(OVF.format(disk=vmdk.name, capacity=size))
            tar.add(ovf, arcname=ovf.name)
        if vmdk is not None:
            tar.add(vmdk, arcname=vmdk.name)
    return out


def domain_xml(disk: Path, out: Path, name: str = LIBVIRT_VM, mac: str = MAC) -> Path:
    """virt-install's domain for ``disk``; the test driver sets no machine type, a real one does."""
    xml = subprocess.run(
        ["virt-install", "--print-xml", "--connect", "test:///default", "--name", name, "--memory", "192",
         "--vcpus", "1", "--import", "--disk", f"path={disk},bus=virtio,driver.type=qcow2",
         "--network", f"network=default,mac={mac},model=virtio", "--osinfo", "detect=off,name=generic",
         "--graphics", "none", "--noautoconsole"],
        capture_output=True, text=True, check=True, timeout=120).stdout
    root = ET.fromstring(xml)
    os_type = root.find("os/type")
    assert os_type is not None
    os_type.set("machine", "pc")
    out.write_text(ET.tostring(root, encoding="unicode"))
    return out


@pytest.fixture(scope="module")
def exports(lab: LabHandle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("exports")
    lab_disk = layout(lab).shared_datastore / "images" / "lab-disk" / "disk.qcow2"
    vmdk = folder / "exported-vm-disk1.vmdk"
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", str(lab_disk),
                    str(vmdk)], check=True)
    libvirt_disk = folder / "libvirt-vm.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(lab_disk), str(libvirt_disk)], check=True)
    return {"ova": make_ova(folder / "exported-vm.ova", vmdk), "vmdk": vmdk,
            "xml": domain_xml(libvirt_disk, folder / "libvirt-vm.xml"), "qcow2": libvirt_disk}


@pytest.fixture(scope="module")
def imported(lab: LabHandle, exports: dict[str, Path]) -> Iterator[dict[str, Any]]:
    ova = vmshift_json(lab, "vm", "import-ova", str(exports["ova"]), "--host", "host-1", "--datastore",
                       "shared-1", "--network-map", "Corp LAN=VM Network", "--name", OVA_VM, "--start")
    libvirt = vmshift_json(lab, "vm", "import-libvirt", str(exports["xml"]), "--host", "host-2",
                           "--datastore", "shared-1", "--network-map", "default=VM Network", "--start")
    yield {"ova": ova, "libvirt": libvirt}
    for vm in (OVA_VM, LIBVIRT_VM):
        vmshift(lab, "vm", "stop", vm, check=False)
        vmshift(lab, "vm", "delete", vm, check=False)


def test_an_ova_and_a_libvirt_domain_are_imported_and_boot(lab: LabHandle, imported: dict[str, Any]) -> None:
    images = layout(lab).shared_datastore / "images"
    ova, libvirt = imported["ova"], imported["libvirt"]
    assert ova["state"] == "success", ova
    assert ova["result"]["images"] == [f"{OVA_VM}-disk0"] and "SCSI controller 'SCSI controller 0'" in \
        ova["result"]["ignored"], ova["result"]
    assert libvirt["state"] == "success", libvirt
    assert libvirt["result"]["images"] == [f"{LIBVIRT_VM}-disk0"], libvirt["result"]

    a = vmshift_json(lab, "vm", "show", OVA_VM)
    assert (a["host"], a["cpus"], a["memory_mib"], a["power_state"]) == ("host-1", 2, 192, "poweredOn"), a
    assert [n["network"] for n in a["nics"]] == ["VM Network"]
    b = vmshift_json(lab, "vm", "show", LIBVIRT_VM)
    assert (b["host"], b["cpus"], b["memory_mib"], b["power_state"]) == ("host-2", 1, 192, "poweredOn"), b
    assert [(n["network"], n["mac"]) for n in b["nics"]] == [("VM Network", MAC)]
    assert b["machine_type"].startswith("pc-i440fx-"), b["machine_type"]  # 'pc' pinned to its version

    # each VM's disk is an overlay of its imported image, which holds the exported disk's data
    for vm in (OVA_VM, LIBVIRT_VM):
        meta = json.loads((images / f"{vm}-disk0" / "image.json").read_text())
        assert meta["kind"] == "disk" and meta["disk_size_mib"] == 20, meta
        info = qemu_img_info(layout(lab).shared_datastore / vm / "disk0.qcow2")
        assert info["backing-filename"] == f"../images/{vm}-disk0/disk.qcow2"
    assert meta["imported_from"].endswith("libvirt-vm.qcow2")
    (pid,) = qemu_pids(b["uuid"])
    assert MAC.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()

    for vm, view in ((OVA_VM, a), (LIBVIRT_VM, b)):
        check = guest_check(lab, vm)
        assert check["echo"] and check["memtest"]["mismatches"] == 0, (vm, check)
        assert view["ip"], view


def _leftovers(lab: LabHandle) -> tuple[list[str], list[str]]:
    images = sorted(p.name for p in (layout(lab).shared_datastore / "images").iterdir())
    vms = sorted(v["name"] for v in vmshift_json(lab, "vm", "list"))
    return images, vms


def _refused(lab: LabHandle, *args: str, network: str = "Corp LAN") -> str:
    proc = vmshift(lab, "vm", *args, "--host", "host-1", "--datastore", "shared-1", "--network-map",
                   f"{network}=VM Network", check=False, env={**lab.env, "COLUMNS": "1000"})  # one line
    assert proc.returncode != 0, proc.stdout
    return proc.stderr


def test_bad_input_is_refused_and_leaves_nothing(lab: LabHandle, exports: dict[str, Path],
                                                 tmp_path: Path) -> None:
    before = _leftovers(lab)

    cut = tmp_path / "cut.ova"
    cut.write_bytes(exports["ova"].read_bytes()[: exports["ova"].stat().st_size // 2])
    err = _refused(lab, "import-ova", str(cut), "--name", "bad-1")
    assert "is truncated: it ends inside exported-vm-disk1.vmdk" in err, err

    no_ovf = make_ova(tmp_path / "no-ovf.ova", exports["vmdk"], with_ovf=False)
    err = _refused(lab, "import-ova", str(no_ovf), "--name", "bad-2")
    assert "holds no OVF descriptor" in err, err

    damaged_disk = tmp_path / "damaged.qcow2"
    damaged_disk.write_bytes(exports["qcow2"].read_bytes()[:300_000])
    xml = domain_xml(damaged_disk, tmp_path / "damaged.xml", "bad-3", mac="52:54:00:1a:be:12")
    err = _refused(lab, "import-libvirt", str(xml), network="default")
    assert "is corrupt" in err and "bad-3-disk0" not in err, err

    network_disk = tmp_path / "network-disk.xml"
    network_disk.write_text(exports["xml"].read_text().replace(
        '<disk type="file" device="disk">', '<disk type="network" device="disk">').replace(
        "<interface", '<hostdev mode="subsystem" type="pci"/><interface'))
    err = _refused(lab, "import-libvirt", str(network_disk), "--name", "bad-4")
    assert "disk vda has the type 'network'; only file and block disks are imported" in err, err
    assert "a passed-through host device" in err and "network 'default'" in err, err  # all listed at once

    assert _leftovers(lab) == before
