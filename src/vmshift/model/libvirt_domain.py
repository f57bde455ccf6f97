"""Read a libvirt domain XML (``virsh dumpxml``, ``virt-install --print-xml``) into a ``ForeignVm``.

Mapped: name, vcpu, memory (with its unit), the machine type of ``os/type``, file and block disks
(their driver type as the format), and network or bridge interfaces with their MACs. Refused, all
listed at once: disks of any other type (network, volume, nvme, dir) or device (lun), CD-ROMs or
floppies holding a medium, non-x86 guests, UEFI or direct kernel boot (vmshift boots disks by
SeaBIOS), interfaces of other types, and devices that tie a VM to its host (hostdev, filesystem
shares, TPM, shared memory). Left out, named in the result: consoles, graphics, video, input,
sound, controllers, channels and the like.
"""

from __future__ import annotations

from xml.etree.ElementTree import Element

from vmshift.errors import InvalidInputError
from vmshift.model.foreign_vm import ForeignDisk, ForeignNic, ForeignVm, to_mib, vm_name_from
from vmshift.model.images import ImportFormat
from vmshift.model.ovf import parse_xml

KIB = 1 << 10
#: x86 guests: qemu-system-x86_64 runs 32-bit ones too (libvirt's test driver only offers i686).
ARCHES = ("x86_64", "i686")
_DISK_TYPES = ("file", "block")
_NIC_TYPES = ("network", "bridge")
_LEFT_OUT = ("emulator", "console", "serial", "parallel", "channel", "graphics", "video", "input", "sound",
             "audio", "controller", "memballoon", "rng", "watchdog", "panic", "hub", "redirfilter", "iommu",
             "vsock")
_HOST_BOUND = {"hostdev": "a passed-through host device", "filesystem": "a shared host folder",
               "tpm": "a TPM", "shmem": "shared host memory", "smartcard": "a smartcard",
               "redirdev": "a redirected USB device", "lease": "a lock lease", "nvram": "NVRAM",
               "memory": "a memory device", "crypto": "a crypto device"}


def parse_domain(text: str, what: str = "The domain XML") -> ForeignVm:
    root = parse_xml(text, what)
    if root.tag != "domain":
        raise InvalidInputError(f"{what} is not a libvirt domain (its root is {root.tag!r}).",
                                hint="Give the output of 'virsh dumpxml VM'.")
    problems: list[str] = []
    vm = ForeignVm(name=vm_name_from(root.findtext("name") or "imported"))
    vcpu = (root.findtext("vcpu") or "1").strip()
    if vcpu.isdigit() and int(vcpu) > 0:
        vm.cpus = int(vcpu)
    else:
        problems.append(f"the vcpu count {vcpu!r} is not a positive number")
    memory = root.find("memory")
    if memory is None:
        problems.append("it gives no memory size")
    else:
        mib = to_mib(memory.text, memory.get("unit"), KIB, "the memory", problems)
        if mib is not None:
            vm.memory_mib = mib
    _os(root, vm, problems)
    devices = root.find("devices")
    for dev in list(devices) if devices is not None else []:
        if dev.tag == "disk":
            disk = _disk(dev, len(vm.disks), problems, vm.ignored)
            if disk is not None:
                vm.disks.append(disk)
        elif dev.tag == "interface":
            nic = _nic(dev, problems)
            if nic is not None:
                vm.nics.append(nic)
        elif dev.tag in _HOST_BOUND:
            problems.append(f"it has {_HOST_BOUND[dev.tag]} ({dev.tag})")
        elif dev.tag in _LEFT_OUT:
            vm.ignored.append(dev.tag if dev.get("type") is None else f"{dev.tag} ({dev.get('type')})")
        else:
            problems.append(f"it has a {dev.tag} device, which vmshift does not know")
    vm.problems = problems
    return vm


def _os(root: Element, vm: ForeignVm, problems: list[str]) -> None:
    os_el = root.find("os")
    type_el = os_el.find("type") if os_el is not None else None
    if os_el is None or type_el is None:
        return
    if (type_el.text or "hvm").strip() != "hvm":
        problems.append(f"its OS type is {type_el.text!r}, not a full virtual machine (hvm)")
    arch = type_el.get("arch")
    if arch is not None and arch not in ARCHES:
        problems.append(f"its architecture is {arch}, and vmshift runs x86 guests only")
    vm.machine_type = type_el.get("machine") or None
    if os_el.get("firmware") == "efi" or os_el.find("loader") is not None:
        problems.append("it boots by UEFI (os/loader or firmware='efi'); vmshift boots disks by SeaBIOS")
    if os_el.find("kernel") is not None:
        problems.append("it boots a kernel given outside its disk (os/kernel)")


def _disk(dev: Element, index: int, problems: list[str], ignored: list[str]) -> ForeignDisk | None:
    kind, device = dev.get("type", "file"), dev.get("device", "disk")
    target = dev.find("target")
    label = (target.get("dev") if target is not None else None) or f"disk {index}"
    source = dev.find("source")
    path = None if source is None else source.get("file") if kind == "file" else source.get("dev")
    if device in ("cdrom", "floppy"):
        if kind in _DISK_TYPES and path is None:
            ignored.append(f"empty {device} {label}")
        else:
            problems.append(f"{device} {label} holds a medium ({kind}); attach it again after the import")
        return None
    if device != "disk":
        problems.append(f"disk {label} is a {device!r} device; only plain disks are imported")
        return None
    if kind not in _DISK_TYPES:
        problems.append(f"disk {label} has the type {kind!r}; only file and block disks are imported")
        return None
    if not path or not path.startswith("/"):
        problems.append(f"disk {label} has no absolute source path")
        return None
    driver = dev.find("driver")
    fmt_name = driver.get("type") if driver is not None else None
    fmt = None
    if fmt_name is not None:
        try:
            fmt = ImportFormat(fmt_name)
        except ValueError:
            problems.append(f"disk {label} has the format {fmt_name!r}, which vmshift does not import")
            return None
    if dev.find("backingStore/source") is not None:
        problems.append(f"disk {label} is an overlay of another file (backingStore); flatten it first")
        return None
    return ForeignDisk(label=label, source=path, format=fmt)


def _nic(dev: Element, problems: list[str]) -> ForeignNic | None:
    kind = dev.get("type", "")
    source = dev.find("source")
    mac_el = dev.find("mac")
    mac = mac_el.get("address") if mac_el is not None else None
    if kind not in _NIC_TYPES:
        problems.append(f"an interface has the type {kind!r}; only network and bridge interfaces are mapped")
        return None
    network = source.get(kind) if source is not None else None
    if not network:
        problems.append(f"a {kind} interface names no {kind}")
        return None
    return ForeignNic(network=network, mac=mac.lower() if mac else None)
