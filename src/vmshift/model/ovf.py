"""Read an OVF descriptor (DMTF DSP0243, as vSphere and VirtualBox export it) into a ``ForeignVm``.

What is read: the one VirtualSystem's name, its VirtualHardwareSection items of CPUs (ResourceType 3),
memory (4), disks (17, through DiskSection and References to the OVA's files) and NICs (10, their
Connection as the network and Address as the MAC); controllers are not carried over (vmshift gives
every disk virtio), nor are CD-ROMs, floppies, USB, sound and video. The XML is parsed with defusedxml:
an OVA comes from anywhere, and the standard library's parser expands entities (a 'billion laughs'
descriptor would fill the server's memory).
"""

from __future__ import annotations

from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from vmshift.errors import InvalidInputError
from vmshift.model.foreign_vm import MIB, ForeignDisk, ForeignNic, ForeignVm, to_mib, vm_name_from
from vmshift.model.images import ImportFormat

OVF = "http://schemas.dmtf.org/ovf/envelope/1"
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
_NS = {"ovf": OVF, "rasd": RASD}

# CIM ResourceType values (DSP1041) the import reads or knowingly leaves out
CPU, MEMORY, ETHERNET, DISK = "3", "4", "10", "17"
_LEFT_OUT = {"1": "other device", "5": "IDE controller", "6": "SCSI controller", "14": "floppy drive",
             "15": "CD drive", "16": "DVD drive", "20": "storage controller", "23": "USB controller",
             "24": "graphics", "35": "sound card"}


def _attr(el: Element, name: str) -> str | None:
    return el.get(f"{{{OVF}}}{name}", el.get(name))


def _text(el: Element, tag: str) -> str | None:
    found = el.find(f"rasd:{tag}", _NS)
    return found.text.strip() if found is not None and found.text else None


def parse_xml(text: str, what: str) -> Element:
    """The root element of untrusted XML, or a clear refusal."""
    try:
        root: Element = SafeET.fromstring(text)
    except DefusedXmlException as e:
        raise InvalidInputError(f"{what} uses XML entities or DTDs, which are refused ({type(e).__name__}).",
                                hint="Export it again without a DOCTYPE.") from None
    except SafeET.ParseError as e:
        raise InvalidInputError(f"{what} is not well-formed XML ({e}).",
                                hint="Check that the file is whole.") from None
    return root


def parse_ovf(text: str, what: str = "The OVF descriptor") -> ForeignVm:
    root = parse_xml(text, what)
    if root.tag != f"{{{OVF}}}Envelope":
        raise InvalidInputError(f"{what} is not an OVF envelope (its root is {root.tag!r}).",
                                hint=f"An OVF descriptor's root element is Envelope in namespace {OVF}.")
    systems = root.findall("ovf:VirtualSystem", _NS)
    if root.find("ovf:VirtualSystemCollection", _NS) is not None or len(systems) != 1:
        raise InvalidInputError(f"{what} describes {len(systems)} virtual systems at its top; vmshift "
                                "imports an OVF of exactly one VM.", hint="Export each VM to its own OVA.")
    system = systems[0]
    problems: list[str] = []
    ignored: list[str] = []
    files = {_attr(f, "id"): f for f in root.findall("ovf:References/ovf:File", _NS)}
    disks_by_id = {_attr(d, "diskId"): d for d in root.findall("ovf:DiskSection/ovf:Disk", _NS)}
    name_el = system.find("ovf:Name", _NS)
    name = (name_el.text or "").strip() if name_el is not None else ""
    vm = ForeignVm(name=vm_name_from(name or _attr(system, "id") or "imported"))
    hardware = system.find("ovf:VirtualHardwareSection", _NS)
    if hardware is None:
        raise InvalidInputError(f"{what} has no VirtualHardwareSection: it says nothing of the VM's "
                                "hardware.", hint="Export the VM again with its hardware.")
    for item in hardware.findall("ovf:Item", _NS):
        kind = _text(item, "ResourceType") or ""
        label = _text(item, "ElementName") or _text(item, "InstanceID") or f"item of type {kind}"
        if kind == CPU:
            count = _text(item, "VirtualQuantity")
            if count is not None and count.isdigit() and int(count) > 0:
                vm.cpus = int(count)
            else:
                problems.append(f"the CPU count {count!r} is not a positive number")
        elif kind == MEMORY:
            mib = to_mib(_text(item, "VirtualQuantity"), _text(item, "AllocationUnits"), MIB, "the memory",
                         problems)
            if mib is not None:
                vm.memory_mib = mib
        elif kind == ETHERNET:
            network = _text(item, "Connection")
            if not network:
                problems.append(f"NIC {label!r} is connected to no network")
                continue
            vm.nics.append(ForeignNic(network=network, mac=(_text(item, "Address") or None)))
        elif kind == DISK:
            disk = _disk(item, label, disks_by_id, files, problems)
            if disk is not None:
                vm.disks.append(disk)
        elif kind in _LEFT_OUT:
            ignored.append(f"{_LEFT_OUT[kind]} {label!r}")
        else:
            problems.append(f"device {label!r} has CIM resource type {kind or 'none'}, which vmshift does "
                            "not know")
    vm.problems, vm.ignored = problems, ignored
    return vm


def _disk(item: Element, label: str, disks_by_id: dict[str | None, Element],
          files: dict[str | None, Element], problems: list[str]) -> ForeignDisk | None:
    ref = _text(item, "HostResource") or ""
    disk_id = ref.removeprefix("ovf:").removeprefix("/disk/") if "/disk/" in ref else None
    disk = disks_by_id.get(disk_id) if disk_id else None
    if disk is None:
        problems.append(f"disk {label!r} refers to {ref or 'nothing'}, which is not in the DiskSection")
        return None
    fmt = (_attr(disk, "format") or "").lower()
    if fmt and "vmdk" not in fmt:  # a URI such as .../specifications/vmdk.html#streamOptimized
        problems.append(f"disk {label!r} has the format {fmt!r}; an OVA's disks are imported as VMDK only")
        return None
    capacity = to_mib(_attr(disk, "capacity"), _attr(disk, "capacityAllocationUnits"), 1,
                      f"the capacity of disk {label!r}", problems)
    file_ref = _attr(disk, "fileRef")
    if not file_ref:
        return ForeignDisk(label=label, source=None, capacity_mib=capacity)
    file_el = files.get(file_ref)
    href = _attr(file_el, "href") if file_el is not None else None
    if not href:
        problems.append(f"disk {label!r} names the file {file_ref!r}, which is not in References")
        return None
    if file_el is not None and (_attr(file_el, "compression") or _attr(file_el, "chunkSize")):
        problems.append(f"disk {label!r}'s file {href!r} is compressed or chunked in the OVA")
        return None
    if "/" in href or href.startswith("."):
        problems.append(f"disk {label!r}'s file {href!r} is not a plain file name inside the OVA")
        return None
    return ForeignDisk(label=label, source=href, format=ImportFormat.VMDK, capacity_mib=capacity)
