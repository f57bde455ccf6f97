"""The pure reading of OVF descriptors and libvirt domain XML (model/ovf.py, model/libvirt_domain.py)."""

from __future__ import annotations

import pytest

from vmshift.errors import InvalidInputError
from vmshift.model.foreign_vm import ForeignVm, map_networks, to_mib, unit_bytes, vm_name_from
from vmshift.model.images import ImportFormat
from vmshift.model.libvirt_domain import parse_domain
from vmshift.model.ovf import parse_ovf

ITEM = """<Item><rasd:ElementName>{name}</rasd:ElementName><rasd:InstanceID>{iid}</rasd:InstanceID>
<rasd:ResourceType>{kind}</rasd:ResourceType>{extra}</Item>"""


def ovf(items: str, disks: str | None = None, files: str | None = None, name: str = "Web server 01") -> str:
    disks = disks if disks is not None else (
        '<Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="20" '
        'ovf:capacityAllocationUnits="byte * 2^30" '
        'ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>')
    files = files if files is not None else '<File ovf:id="file1" ovf:href="web-disk1.vmdk"/>'
    return f"""<?xml version="1.0"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References>{files}</References>
  <DiskSection><Info>disks</Info>{disks}</DiskSection>
  <NetworkSection><Info>nets</Info><Network ovf:name="VM Network"/></NetworkSection>
  <VirtualSystem ovf:id="web01"><Info>a VM</Info><Name>{name}</Name>
    <VirtualHardwareSection><Info>hw</Info>{items}</VirtualHardwareSection>
  </VirtualSystem>
</Envelope>"""


CPU2 = ITEM.format(name="2 vCPU", iid=1, kind=3, extra="<rasd:VirtualQuantity>2</rasd:VirtualQuantity>")
MEM = ITEM.format(name="mem", iid=2, kind=4, extra="<rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>"
                  "<rasd:VirtualQuantity>1536</rasd:VirtualQuantity>")
DISK = ITEM.format(name="Hard disk 1", iid=3, kind=17, extra="<rasd:HostResource>ovf:/disk/vmdisk1"
                   "</rasd:HostResource>")
NIC = ITEM.format(name="Network adapter 1", iid=4, kind=10, extra="<rasd:Connection>VM Network"
                  "</rasd:Connection><rasd:Address>00:50:56:AB:CD:EF</rasd:Address>")
SCSI = ITEM.format(name="SCSI controller 0", iid=5, kind=6, extra="")


def test_ovf_maps_cpus_memory_disks_and_nics() -> None:
    vm = parse_ovf(ovf(CPU2 + MEM + SCSI + DISK + NIC))
    assert (vm.name, vm.cpus, vm.memory_mib) == ("Web-server-01", 2, 1536)
    assert [(d.source, d.format, d.capacity_mib) for d in vm.disks] == [
        ("web-disk1.vmdk", ImportFormat.VMDK, 20 * 1024)]
    assert [(n.network, n.mac) for n in vm.nics] == [("VM Network", "00:50:56:AB:CD:EF")]
    assert vm.ignored == ["SCSI controller 'SCSI controller 0'"] and vm.problems == []


def test_ovf_disk_without_a_file_is_an_empty_disk() -> None:
    disks = ('<Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="1073741824"/>'
             '<Disk ovf:diskId="data" ovf:capacity="512" ovf:capacityAllocationUnits="byte * 2^20"/>')
    data = ITEM.format(name="data", iid=9, kind=17,
                       extra="<rasd:HostResource>ovf:/disk/data</rasd:HostResource>")
    vm = parse_ovf(ovf(DISK + data, disks=disks))
    assert [(d.source, d.capacity_mib) for d in vm.disks] == [("web-disk1.vmdk", 1024), (None, 512)]


@pytest.mark.parametrize(("items", "files", "disks", "problem"), [
    (DISK + ITEM.format(name="pci", iid=7, kind=99, extra=""), None, None, "CIM resource type 99"),
    (ITEM.format(name="d", iid=3, kind=17, extra="<rasd:HostResource>ovf:/disk/nope</rasd:HostResource>"),
     None, None, "not in the DiskSection"),
    (DISK, '<File ovf:id="file1" ovf:href="disk.vmdk.gz" ovf:compression="gzip"/>', None, "compressed"),
    (DISK, '<File ovf:id="file1" ovf:href="../etc/passwd"/>', None, "not a plain file name"),
    (DISK, None, '<Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="1" ovf:format="qcow2"/>',
     "imported as VMDK only"),
    (DISK + ITEM.format(name="nic", iid=4, kind=10, extra=""), None, None, "connected to no network"),
])
def test_ovf_lists_what_it_cannot_map(items: str, files: str | None, disks: str | None, problem: str) -> None:
    vm = parse_ovf(ovf(items, disks=disks, files=files))
    assert any(problem in p for p in vm.problems), vm.problems
    with pytest.raises(InvalidInputError, match="cannot be imported"):
        vm.refuse_problems("The OVA")


@pytest.mark.parametrize(("text", "message"), [
    ("<not xml", "not well-formed XML"),
    ('<!DOCTYPE x [<!ENTITY a "aaaa">]><Envelope>&a;</Envelope>', "entities or DTDs"),
    ("<domain/>", "not an OVF envelope"),
])
def test_ovf_refuses_what_is_not_a_descriptor(text: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        parse_ovf(text)


DOMAIN = """<domain type="kvm">
  <name>db 1</name>
  <memory unit="GiB">2</memory>
  <vcpu placement="static">4</vcpu>
  <os><type arch="x86_64" machine="pc-q35-9.0">hvm</type><boot dev="hd"/></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type="file" device="disk"><driver name="qemu" type="qcow2"/>
      <source file="/var/lib/libvirt/images/db1.qcow2"/><target dev="vda" bus="virtio"/></disk>
    <disk type="block" device="disk"><driver name="qemu" type="raw"/>
      <source dev="/dev/vg0/db1-data"/><target dev="vdb" bus="virtio"/></disk>
    <disk type="file" device="cdrom"><target dev="sda" bus="sata"/><readonly/></disk>
    <interface type="network"><mac address="52:54:00:AA:BB:CC"/><source network="default"/>
      <model type="virtio"/></interface>
    <interface type="bridge"><source bridge="br-lan"/></interface>
    <graphics type="vnc" port="-1"/>
    <console type="pty"/>
  </devices>
</domain>"""


def test_domain_maps_disks_macs_cpus_memory_and_machine() -> None:
    vm = parse_domain(DOMAIN)
    assert (vm.name, vm.cpus, vm.memory_mib, vm.machine_type) == ("db-1", 4, 2048, "pc-q35-9.0")
    assert [(d.label, d.source, d.format) for d in vm.disks] == [
        ("vda", "/var/lib/libvirt/images/db1.qcow2", ImportFormat.QCOW2),
        ("vdb", "/dev/vg0/db1-data", ImportFormat.RAW)]
    assert [(n.network, n.mac) for n in vm.nics] == [("default", "52:54:00:aa:bb:cc"), ("br-lan", None)]
    assert vm.problems == []
    assert "empty cdrom sda" in vm.ignored and "graphics (vnc)" in vm.ignored


def test_domain_memory_without_unit_is_kib() -> None:
    vm = parse_domain("<domain><name>a</name><memory>196608</memory><devices/></domain>")
    assert vm.memory_mib == 192


def test_domain_refuses_with_every_problem_listed() -> None:
    bad = DOMAIN.replace('<disk type="block"', '<disk type="network"').replace(
        "<source dev=", '<source protocol="rbd" name="pool/img" dev=').replace(
        '<os>', '<os firmware="efi">').replace(
        "<console", '<hostdev mode="subsystem" type="pci"/><interface type="user"/><console')
    vm = parse_domain(bad)
    with pytest.raises(InvalidInputError) as info:
        vm.refuse_problems("The libvirt domain")
    text = info.value.message
    for part in ("disk vdb has the type 'network'", "boots by UEFI", "passed-through host device",
                 "interface has the type 'user'"):
        assert part in text, text


@pytest.mark.parametrize(("edit", "problem"), [
    (('arch="x86_64"', 'arch="aarch64"'), "x86 guests only"),
    (('type="qcow2"', 'type="qed"'), "format 'qed'"),
    (('device="cdrom"><target', 'device="cdrom"><source file="/iso/x.iso"/><target'), "holds a medium"),
    (('<disk type="block" device="disk">', '<disk type="block" device="lun">'), "'lun' device"),
])
def test_domain_problems(edit: tuple[str, str], problem: str) -> None:
    vm = parse_domain(DOMAIN.replace(*edit))
    assert any(problem in p for p in vm.problems), vm.problems


def test_a_vm_without_disks_is_refused() -> None:
    vm = parse_domain("<domain><name>a</name><memory>1024</memory><devices/></domain>")
    with pytest.raises(InvalidInputError, match="no disk to boot from"):
        vm.refuse_problems("The libvirt domain")


def test_network_mapping() -> None:
    vm = parse_domain(DOMAIN)
    assert map_networks(vm, {"default": "VM Network", "br-lan": "lan"}, {"VM Network", "lan"}) == [
        "VM Network", "lan"]
    assert vm.problems == []
    vm = parse_domain(DOMAIN)
    map_networks(vm, {"default": "nope", "other": "lan"}, {"VM Network", "lan"})
    assert vm.problems == [
        "NIC 0 is on network 'default': --network-map maps it to 'nope', which does not exist",
        "NIC 1 is on network 'br-lan': no vmshift network has that name (map it: --network-map "
        "'br-lan=NETWORK')",
        "--network-map names 'other', which no NIC is on"]


def test_same_name_networks_need_no_map_and_bad_macs_are_refused() -> None:
    vm = ForeignVm.model_validate({"name": "a", "nics": [{"network": "lan", "mac": "52:54:00:zz:00:01"}]})
    assert map_networks(vm, {}, {"lan"}) == ["lan"]
    assert vm.problems == ["NIC 0's MAC address '52:54:00:zz:00:01' is not six hex pairs"]


def test_units() -> None:
    assert unit_bytes("byte * 2^20", 1) == 1 << 20
    assert unit_bytes("KiB", 1) == 1024 and unit_bytes(None, 7) == 7 and unit_bytes("furlong", 1) is None
    problems: list[str] = []
    assert to_mib("1", "G", 1024, "memory", problems) == 1024
    assert to_mib("1.5", "G", 1024, "memory", problems) is None and "not a whole number" in problems[0]
    assert vm_name_from("  ") == "imported" and vm_name_from("_x y") == "x-y"
