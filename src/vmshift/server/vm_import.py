"""``POST /vm-imports``: make the VM an OVA or a libvirt domain describes (docs/images.md).

Everything that can be refused is refused in the request, before anything is written: the descriptor
(its unmappable parts all listed), the networks, the host's capacity, the names, and the first disk's
``qemu-img check`` (the agent starts converting it only when whole). The task then imports each disk
as an image ``VM-diskN`` beside the others on the datastore, creates the VM on overlays of them and
defines it on the host. If a later disk is refused or anything after fails, the images imported so far
are removed and no VM row stays: an import either makes the whole VM or leaves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from vmshift.client.agent import AgentPool
from vmshift.errors import ConflictError, InvalidInputError
from vmshift.model.api import VmCreate
from vmshift.model.foreign_vm import ForeignVm, map_networks
from vmshift.model.images import AgentImageImport, ImageImportRequest, VmImportRequest, VmImportSource
from vmshift.model.libvirt_domain import parse_domain
from vmshift.model.ovf import parse_ovf
from vmshift.server.db.schema import NetworkRow, VmRow
from vmshift.server.image_import import choose_host, import_all, refresh_facts, remove_images
from vmshift.server.inventory import get_host
from vmshift.server.tasks import TaskBody, TaskContext
from vmshift.server.vm_create import ImportedParts, check_datastore, check_host_usable, create_vm_row
from vmshift.server.vm_tasks import create_body

EMPTY_DISK_MIB = 1024  # an OVF disk without a file or capacity (never seen from vSphere)


@dataclass
class ImportPlan:
    """What the request decided: the VM to create and the disk files to import, in order."""

    vm: ForeignVm
    create: VmCreate
    parts: ImportedParts
    images: list[AgentImageImport] = field(default_factory=list)
    host: str = ""
    address: str = ""

    def summary(self) -> dict[str, Any]:
        return {"vm": self.create.name, "host": self.host, "cpus": self.create.cpus,
                "memory_mib": self.create.memory_mib, "machine_type": self.create.machine_type,
                "images": [job.name for job in self.images], "networks": self.create.networks,
                "ignored": self.vm.ignored}


async def read_descriptor(agents: AgentPool, address: str, req: VmImportRequest) -> ForeignVm:
    if req.source is VmImportSource.LIBVIRT:
        assert req.domain_xml is not None
        return parse_domain(req.domain_xml)
    assert req.file is not None
    contents = await agents.get(address).inspect_ova(req.file)
    vm = parse_ovf(contents.descriptor, f"The OVF descriptor {contents.descriptor_name} of {req.file}")
    for disk in vm.disks:
        if disk.source is not None and disk.source not in contents.files:
            vm.problems.append(f"disk {disk.label!r}'s file {disk.source!r} is not in the OVA")
    return vm


def plan(s: Session, req: VmImportRequest, vm: ForeignVm) -> ImportPlan:
    """Map the descriptor onto the inventory and dry-run the VM's creation (rolled back by the caller)."""
    what = "The OVA" if req.source is VmImportSource.OVA else "The libvirt domain"
    networks = map_networks(vm, req.network_map, set(s.scalars(select(NetworkRow.name))))
    if vm.disks and vm.disks[0].source is None:
        vm.problems.append("its first disk is empty: there is nothing to boot")
    vm.refuse_problems(what)
    name = req.name or vm.name
    if s.scalar(select(VmRow.id).where(VmRow.name == name)) is not None:
        raise ConflictError(f"A VM named {name!r} already exists.", hint="Import it under another --name.")
    images = [(f"{name}-disk{i}" if d.source is not None else None) for i, d in enumerate(vm.disks)]
    taken = [image for image in images if image is not None]
    choose_host(s, ImageImportRequest(file="/", name=taken[0], datastore=req.datastore, host=req.host), taken)
    boot = images[0]
    assert boot is not None
    try:
        create = VmCreate(name=name, host=req.host, cpus=vm.cpus, memory_mib=vm.memory_mib,
                          datastore=req.datastore, networks=networks, disks_mib=[],
                          disk_image=boot, machine_type=vm.machine_type, start=req.start)
    except ValidationError as e:
        wrong = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise InvalidInputError(f"{what} describes a VM vmshift cannot make ({wrong}).",
                                hint="Give --name if the name is the problem; else change the VM and export "
                                "it again.") from None
    parts = ImportedParts(disks=[(image, d.capacity_mib or (1 if image else EMPTY_DISK_MIB))
                                 for image, d in zip(images, vm.disks, strict=True)],
                          macs=[n.mac.lower() if n.mac else None for n in vm.nics])
    create_vm_row(s, create, imported=ImportedParts(parts.disks, parts.macs, images_pending=True))
    out = ImportPlan(vm=vm, create=create, parts=parts)
    for image, disk in zip(images, vm.disks, strict=True):
        if image is None or disk.source is None:
            continue
        if req.source is VmImportSource.OVA:
            assert req.file is not None
            job = AgentImageImport(file=req.file, name=image, datastore=req.datastore, format=disk.format,
                                   member=disk.source)
        else:
            job = AgentImageImport(file=disk.source, name=image, datastore=req.datastore, format=disk.format)
        out.images.append(job)
    return out


def import_host(s: Session, req: VmImportRequest) -> str:
    """The agent address of the host the VM is imported to (connected, seeing the datastore)."""
    host = get_host(s, req.host)
    check_host_usable(host)
    check_datastore(s, host, req.datastore)
    return host.address


def import_vm_body(sessions: sessionmaker[Session], agents: AgentPool, p: ImportPlan) -> TaskBody:
    """Import the disks one after another (the first already started by the request), then create and
    define the VM; on any failure remove what was imported (create_body drops the VM row itself)."""

    async def body(ctx: TaskContext) -> dict[str, Any]:
        agent = agents.get(p.address)
        await import_all(agent, p.images, ctx, span=80)
        try:
            ctx.progress("registering the VM", 85)
            await refresh_facts(sessions, agent, p.host)
            with sessions.begin() as s:
                create_vm_row(s, p.create, imported=p.parts)
            result = await create_body(sessions, agents, p.create.name, p.create.start)(ctx)
        except BaseException:
            await remove_images(agent, p.create.datastore, [job.name for job in p.images])
            raise
        return {**p.summary(), "power_state": (result or {}).get("power_state")}

    return body
