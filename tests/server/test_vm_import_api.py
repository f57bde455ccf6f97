"""VM import from an OVA or a libvirt domain (issue 10) against fake agents: the VM the server makes,
and every refusal a 4xx (or a failed task) with nothing left behind: no VM row, no image."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import AgentFactory, ServerHarness
from vmshift_fake_agent import FakeAgent

POOL = {"cidr": "10.213.4.0/24", "first": "10.213.4.10", "last": "10.213.4.20"}
DOMAIN = """<domain type="kvm"><name>db1</name><memory unit="MiB">512</memory><vcpu>2</vcpu>
  <os><type arch="x86_64" machine="pc">hvm</type></os>
  <devices>
    <disk type="file" device="disk"><driver name="qemu" type="qcow2"/><source file="/srv/db1.qcow2"/>
      <target dev="vda" bus="virtio"/></disk>
    <disk type="file" device="disk"><driver name="qemu" type="raw"/><source file="/srv/{second}"/>
      <target dev="vdb" bus="virtio"/></disk>
    <interface type="network"><mac address="52:54:00:12:34:56"/><source network="default"/></interface>
    <graphics type="vnc"/>
  </devices></domain>"""
OVF = """<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"
 xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
 xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
 <References><File ovf:id="f1" ovf:href="web-disk1.vmdk"/></References>
 <DiskSection><Info>d</Info><Disk ovf:diskId="d1" ovf:fileRef="f1" ovf:capacity="30"
   ovf:capacityAllocationUnits="byte * 2^20"/>
   <Disk ovf:diskId="d2" ovf:capacity="64" ovf:capacityAllocationUnits="byte * 2^20"/></DiskSection>
 <VirtualSystem ovf:id="web"><Info>v</Info><Name>web</Name><VirtualHardwareSection><Info>h</Info>
  <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType>
    <rasd:VirtualQuantity>1</rasd:VirtualQuantity></Item>
  <Item><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType>
    <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
    <rasd:VirtualQuantity>384</rasd:VirtualQuantity></Item>
  <Item><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType>
    <rasd:HostResource>ovf:/disk/d1</rasd:HostResource></Item>
  <Item><rasd:InstanceID>4</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType>
    <rasd:HostResource>ovf:/disk/d2</rasd:HostResource></Item>
  <Item><rasd:InstanceID>5</rasd:InstanceID><rasd:ResourceType>10</rasd:ResourceType>
    <rasd:Connection>Corp LAN</rasd:Connection></Item>
 </VirtualHardwareSection></VirtualSystem></Envelope>"""


@pytest.fixture
def cluster(server: ServerHarness, agents: AgentFactory) -> FakeAgent:
    ag1, t1 = agents("host-1")
    server.add_host(t1)
    assert server.client.put("/networks/VM Network/ip-pool", json=POOL).status_code == 200
    ag1.ovas["/srv/web.ova"] = {"descriptor": OVF, "descriptor_name": "web.ovf",
                                "files": ["web-disk1.vmdk", "web.ovf"]}
    return ag1


def libvirt(second: str = "db1-data.img", **kw: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"source": "libvirt", "domain_xml": DOMAIN.format(second=second), "host": "host-1",
                         "datastore": "shared-1", "network_map": {"default": "VM Network"}}
    b.update(kw)
    return b


def ova(**kw: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"source": "ova", "file": "/srv/web.ova", "host": "host-1", "datastore": "shared-1",
                         "network_map": {"Corp LAN": "VM Network"}}
    b.update(kw)
    return b


def run(server: ServerHarness, b: dict[str, Any]) -> dict[str, Any]:
    r = server.client.post("/vm-imports", json=b)
    assert r.status_code == 202, r.text
    done: dict[str, Any] = server.wait_task(r.json()["id"])
    return done


def test_a_libvirt_domain_becomes_a_vm_on_its_imported_disks(
    server: ServerHarness, cluster: FakeAgent
) -> None:
    done = run(server, libvirt(start=True))
    assert done["state"] == "success" and done["kind"] == "vm.import", done
    assert done["result"]["images"] == ["db1-disk0", "db1-disk1"]
    assert done["result"]["ignored"] == ["graphics (vnc)"]
    assert [(j["source"], j["format"]) for j in cluster.imports.values()] == [
        ("/srv/db1.qcow2", "qcow2"), ("/srv/db1-data.img", "raw")]
    spec = cluster.specs["db1"]
    assert (spec.cpus, spec.memory_mib) == (2, 512) and spec.machine_type.startswith("pc-i440fx-")
    assert [(d.file, d.backing_image) for d in spec.disks] == [("disk0.qcow2", "db1-disk0"),
                                                                ("disk1.qcow2", "db1-disk1")]
    assert [(n.network, n.mac) for n in spec.nics] == [("VM Network", "52:54:00:12:34:56")]
    vm = server.client.get("/vms/db1").json()
    assert vm["power_state"] == "poweredOn" and vm["ip"], vm


def test_an_ova_becomes_a_vm_with_an_empty_second_disk(server: ServerHarness, cluster: FakeAgent) -> None:
    done = run(server, ova(name="web-1"))
    assert done["state"] == "success", done
    assert cluster.imports["web-1-disk0"]["source"] == "/srv/web.ova"
    spec = cluster.specs["web-1"]
    assert (spec.cpus, spec.memory_mib) == (1, 384)
    assert [(d.backing_image, d.size_mib) for d in spec.disks] == [("web-1-disk0", 30), (None, 64)]
    assert [n.network for n in spec.nics] == ["VM Network"]


def test_image_import_of_an_ova_imports_its_disk(server: ServerHarness, cluster: FakeAgent) -> None:
    r = server.client.post("/images/import", json={"file": "/srv/web.ova", "name": "web",
                                                   "datastore": "shared-1"})
    assert r.status_code == 202, r.text
    task = server.wait_task(r.json()["id"])
    assert task["state"] == "success" and task["result"]["images"] == ["web"], task
    assert cluster.imports["web"]["format"] == "vmdk"


def _refusals() -> list[tuple[str, dict[str, Any], int, str]]:
    unknown_disk = libvirt()
    unknown_disk["domain_xml"] = unknown_disk["domain_xml"].replace('<disk type="file" device="disk"><driver '
                                                                    'name="qemu" type="raw"/>',
                                                                    '<disk type="volume" device="disk">', 1)
    return [
        ("unknown disk type", unknown_disk, 400, "disk vdb has the type 'volume'; only file and block disks"),
        ("unmapped network", libvirt(network_map={}), 400, "NIC 0 is on network 'default'"),
        ("map to no network", ova(network_map={"Corp LAN": "nope"}), 400,
         "maps it to 'nope', which does not"),
        ("OVA without OVF", ova(file="/srv/bare.ova"), 400, "holds no OVF descriptor"),
        ("corrupt first disk", libvirt(domain_xml=DOMAIN.format(second="x").replace("db1.qcow2",
                                                                                     "corrupt.qcow2")),
         400, "is corrupt"),
        ("name taken", libvirt(name="web-1"), 409, "already exists"),
        ("not XML", libvirt(domain_xml="<domain"), 400, "not well-formed XML"),
        ("XML bomb", libvirt(domain_xml='<!DOCTYPE d [<!ENTITY a "x">]><domain>&a;</domain>'), 400,
         "entities or DTDs"),
        ("libvirt with a file", libvirt(file="/srv/x.ova"), 422, "a libvirt import gives 'domain_xml'"),
        ("ova without a file", ova(file=None), 422, "an OVA import gives 'file'"),
        ("unknown host", ova(host="host-9"), 404, "host-9"),
    ]


@pytest.mark.parametrize(("case", "b", "status", "text"), _refusals(), ids=[c[0] for c in _refusals()])
def test_bad_import_is_refused_and_changes_nothing(
    server: ServerHarness, cluster: FakeAgent, case: str, b: dict[str, Any], status: int, text: str
) -> None:
    if case == "name taken":
        assert run(server, ova(name="web-1"))["state"] == "success"
    before, imports = server.counts(), dict(cluster.imports)
    r = server.client.post("/vm-imports", json=b)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert text in err["message"], err
    assert err["hint"]
    assert server.counts() == before and cluster.imports == imports


def test_a_later_disk_refused_removes_the_images_already_imported(
    server: ServerHarness, cluster: FakeAgent
) -> None:
    before = server.counts()
    done = run(server, libvirt(second="corrupt-data.img"))
    assert done["state"] == "error" and "is corrupt" in done["error"]["message"], done
    assert cluster.removed_images == ["db1-disk0"]
    assert "db1" not in cluster.specs
    assert server.client.get("/vms/db1").status_code == 404
    after = server.counts()
    assert (after["vm"], after["mac_allocation"], after["ip_allocation"]) == (
        before["vm"], before["mac_allocation"], before["ip_allocation"])
