"""A VM described by another system (an OVF descriptor, a libvirt domain), read into what vmshift can
make of it: CPUs, memory, machine type, disks, NICs, plus every part it cannot map.

Pure: model/ovf.py and model/libvirt_domain.py fill it from XML text; server/vm_import.py turns it into a
VM. Parts that change what the guest sees (a passed-through device, a disk on a network protocol)
are ``problems`` and the import is refused with all of them listed at once; parts that only change
how the VM is watched (graphics, consoles, USB controllers) are ``ignored`` and named in the result.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, Field

from vmshift.errors import InvalidInputError
from vmshift.model.images import ImportFormat
from vmshift.model.inputs import NAME_MAX

MIB = 1 << 20


class ForeignDisk(BaseModel):
    """One disk, in the VM's order. ``source`` is a path on the importing host (libvirt) or a member
    of the OVA's tar (OVF); None is an empty disk of ``capacity_mib`` that the descriptor asks for."""

    label: str = Field(description="how the descriptor calls it (vda, vmdisk1): for messages")
    source: str | None
    format: ImportFormat | None = Field(default=None, description="as declared; None = as qemu-img sees it")
    capacity_mib: int | None = None


class ForeignNic(BaseModel):
    network: str = Field(description="the network (or bridge) the descriptor connects it to")
    mac: str | None = None


class ForeignVm(BaseModel):
    name: str
    cpus: int = 1
    memory_mib: int = 256
    machine_type: str | None = None
    disks: list[ForeignDisk] = Field(default_factory=list)
    nics: list[ForeignNic] = Field(default_factory=list)
    ignored: list[str] = Field(default_factory=list, description="parts not carried over; harmless")
    problems: list[str] = Field(default_factory=list, description="parts vmshift cannot map")

    def refuse_problems(self, what: str) -> None:
        """Raise one error listing every part that cannot be mapped (none: return)."""
        if not self.disks:
            self.problems.append("it has no disk to boot from")
        if self.problems:
            listed = "; ".join(self.problems)
            raise InvalidInputError(f"{what} cannot be imported: {listed}.",
                                    hint="Change these parts in the source system (or the file) and export "
                                    "it again; docs/images.md lists what is imported.")


_UNITS = {"": 1, "b": 1, "byte": 1, "bytes": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000,
          "m": MIB, "mib": MIB, "mb": 1000**2, "megabytes": MIB, "g": 1 << 30, "gib": 1 << 30,
          "gb": 1000**3, "gigabytes": 1 << 30, "t": 1 << 40, "tib": 1 << 40, "tb": 1000**4,
          "kilobytes": 1 << 10}
_POWER_UNIT = re.compile(r"^\s*byte\s*\*\s*(\d+)\s*\^\s*(\d+)\s*$", re.IGNORECASE)


def unit_bytes(unit: str | None, default: int) -> int | None:
    """Bytes per unit for an OVF allocation unit (``byte * 2^20``, ``MegaBytes``) or a libvirt unit
    (``KiB``, ``G``); ``default`` when none is given; None when it is not a unit of bytes."""
    if unit is None or not unit.strip():
        return default
    power = _POWER_UNIT.match(unit)
    if power:
        base, exponent = int(power[1]), int(power[2])
        return int(base**exponent)
    return _UNITS.get(unit.strip().lower())


def to_mib(value: str | None, unit: str | None, default_unit: int, what: str,
           problems: list[str]) -> int | None:
    """``value`` in ``unit`` as whole MiB (rounded up), or None with a problem recorded."""
    per = unit_bytes(unit, default_unit)
    try:
        amount = int((value or "").strip())
    except ValueError:
        problems.append(f"{what} {value!r} is not a whole number")
        return None
    if per is None:
        problems.append(f"{what} has the unit {unit!r}, which is not a unit of bytes")
        return None
    if amount <= 0:
        problems.append(f"{what} is {amount}")
        return None
    return -(-amount * per // MIB)


def vm_name_from(text: str) -> str:
    """A vmshift VM name from a foreign one ('Web server 01' -> 'Web-server-01')."""
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in text.strip()).lstrip("._-")
    return name[:NAME_MAX] or "imported"


def map_networks(vm: ForeignVm, network_map: dict[str, str], known: set[str]) -> list[str]:
    """The vmshift network of each NIC: ``network_map``'s entry for its network, else a vmshift network
    of the same name; a NIC that maps to nothing known is a problem, as is a MAC that is not one."""
    from vmshift.model.vm import MAC_RE

    mapped: list[str] = []
    for i, nic in enumerate(vm.nics):
        target = network_map.get(nic.network, nic.network)
        if target not in known:
            how = (f"--network-map maps it to {target!r}, which does not exist" if nic.network in network_map
                   else f"no vmshift network has that name (map it: --network-map '{nic.network}=NETWORK')")
            vm.problems.append(f"NIC {i} is on network {nic.network!r}: {how}")
        if nic.mac is not None and not MAC_RE.fullmatch(nic.mac.lower()):
            vm.problems.append(f"NIC {i}'s MAC address {nic.mac!r} is not six hex pairs")
        mapped.append(target)
    unused = sorted(set(network_map) - {n.network for n in vm.nics})
    if unused:
        vm.problems.append(f"--network-map names {', '.join(map(repr, unused))}, which no NIC is on")
    return mapped
