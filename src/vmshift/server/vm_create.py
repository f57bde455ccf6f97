"""VM creation: every check happens before anything is written, so a 4xx changes nothing."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmshift.errors import CapacityError, ConflictError, InvalidInputError, NotFoundError
from vmshift.model.addressing import allocate_ip, generate_mac, ip_kernel_arg, prefixed
from vmshift.model.api import EventKind, VmCreate
from vmshift.model.baseline import NOT_A_BASELINE, choose_baseline, resolve_machine_type
from vmshift.model.enums import BootKind, CloneMode, ConnectionState, PowerState
from vmshift.model.host import HostFacts
from vmshift.model.migration import CheckId, CheckSeverity
from vmshift.model.vm import BootSpec, DiskSpec, NicSpec, SeedSpec, VmSpec
from vmshift.placement.host_checks import connection_check, maintenance_check, networks_check
from vmshift.server.db.schema import (
    DatastoreRow,
    HostRow,
    IpAllocationRow,
    MacAllocationRow,
    NetworkRow,
    VmRow,
)
from vmshift.server.events import record_event
from vmshift.server.inventory import get_host, host_facts, names_hint
from vmshift.server.vm_placement import place_new_vm


def check_host_usable(host: HostRow) -> None:
    """Placement's own rules (``placement.host_checks``), for a host the request named."""
    for r in (connection_check(CheckId.TARGET_CONNECTED, "chosen", host.name, host.connection_state),
              maintenance_check(host.name, host.maintenance, "chosen")):
        if r.severity is CheckSeverity.ERROR:
            raise ConflictError(r.message, hint=r.hint)


def check_datastore(s: Session, host: HostRow, name: str) -> DatastoreRow:
    ds = s.scalar(select(DatastoreRow).where(DatastoreRow.name == name))
    if ds is None:
        raise NotFoundError(
            f"Datastore {name!r} does not exist.",
            hint=names_hint("datastores", list(s.scalars(select(DatastoreRow.name)))),
        )
    if all(link.host_id != host.id for link in ds.hosts):
        seen = [link.datastore.name for link in host.datastores]
        raise InvalidInputError(
            f"Host {host.name} does not see datastore {name!r}.",
            hint=names_hint(f"datastores of {host.name}", seen),
        )
    return ds


def _check_networks(s: Session, host: HostRow, vm: str, names: list[str]) -> list[NetworkRow]:
    if len(set(names)) != len(names):
        raise InvalidInputError("The networks list names a network twice.", hint="List each network once.")
    nets = []
    for name in names:
        net = s.scalar(select(NetworkRow).where(NetworkRow.name == name))
        if net is None:
            raise NotFoundError(
                f"Network {name!r} does not exist.",
                hint=names_hint("networks", list(s.scalars(select(NetworkRow.name)))),
            )
        nets.append(net)
    seen = [n.network.name for n in host.networks]
    r = networks_check(vm, names, host.name, seen)
    if r.severity is CheckSeverity.ERROR:
        raise InvalidInputError(r.message, hint=names_hint(f"networks of {host.name}", seen))
    return nets


def _check_image(host: HostRow, ds: DatastoreRow, image: str) -> None:
    images = next((link.images for link in host.datastores if link.datastore_id == ds.id), [])
    if image not in images:
        raise NotFoundError(
            f"Image {image!r} is not on datastore {ds.name}.",
            hint=names_hint(f"images on {ds.name}", list(images)),
        )


def _check_disk_image(host: HostRow, ds: DatastoreRow, image: str) -> int:
    """The virtual size (MiB) of disk image ``image`` on ``ds`` as ``host`` reports it."""
    seen = next((d for d in host_facts(host).datastores if d.name == ds.name), None)
    disk_images = seen.disk_images if seen is not None else {}
    if image not in disk_images:
        raise NotFoundError(
            f"Disk image {image!r} is not on datastore {ds.name}.",
            hint=names_hint(f"disk images on {ds.name} (import one with 'vmshift image import')",
                            sorted(disk_images)),
        )
    return disk_images[image]


def _check_boot_options(req: VmCreate) -> None:
    if req.disk_image is None:
        if req.ssh_keys:
            raise InvalidInputError("SSH keys go into a cloud-init seed, which only a VM booted from a disk "
                                    "image gets.", hint="Add disk_image, or leave ssh_keys out.")
        if req.clone is not CloneMode.LINKED:
            raise InvalidInputError("clone applies to a VM made from a disk image.",
                                    hint="Add disk_image, or leave clone out.")
    elif req.kernel_args.strip():
        raise InvalidInputError("kernel_args apply to kernel boot only: a VM booted from a disk image runs "
                                "the kernel its own boot loader chooses.",
                                hint="Leave kernel_args out, or boot a kernel image with 'image'.")


def _disks(req: VmCreate, ds: DatastoreRow, image_mib: int | None) -> list[DiskSpec]:
    """The VM's disks: with a disk image the first is made from it (an overlay or a whole copy), at
    least the image's size; the others are empty."""
    sizes = list(req.disks_mib)
    if image_mib is None:
        return [DiskSpec(datastore=ds.name, file=f"disk{i}.qcow2", size_mib=n) for i, n in enumerate(sizes)]
    first = max([image_mib, *sizes[:1]])
    linked = req.clone is CloneMode.LINKED
    disks = [DiskSpec(datastore=ds.name, file="disk0.qcow2", size_mib=first,
                      backing_image=req.disk_image if linked else None,
                      clone_of=None if linked else req.disk_image)]
    return disks + [DiskSpec(datastore=ds.name, file=f"disk{i}.qcow2", size_mib=size)
                    for i, size in enumerate(sizes[1:], start=1)]


@dataclass(frozen=True)
class ImportedParts:
    """What a VM import (server/vm_import.py) fixes beyond a ``VmCreate``: each disk's image (None: an
    empty disk) with the size the descriptor asks for, and each NIC's MAC (None: a new one).
    ``images_pending``: a dry run before the images are imported, so their presence is not checked."""

    disks: list[tuple[str | None, int]]
    macs: list[str | None]
    images_pending: bool = False


def _imported_disks(host: HostRow, ds: DatastoreRow, parts: ImportedParts) -> list[DiskSpec]:
    """Each disk a linked clone of its imported image (at least the image's size), or empty."""
    disks = []
    for i, (image, size_mib) in enumerate(parts.disks):
        if image is not None and not parts.images_pending:
            size_mib = max(size_mib, _check_disk_image(host, ds, image))
        disks.append(DiskSpec(datastore=ds.name, file=f"disk{i}.qcow2", size_mib=size_mib,
                              backing_image=image))
    return disks


def _mac(used: set[str], wanted: str | None, index: int, rng: random.Random | None) -> str:
    if wanted is None:
        return generate_mac(used, rng)
    if wanted in used:
        raise ConflictError(f"The MAC address {wanted} of NIC {index} is taken by another VM.",
                            hint="Remove that VM, or drop the MAC from the descriptor to get a new one.")
    return wanted


def choose_cpu_model(host: HostRow, facts: HostFacts, requested: str | None) -> str:
    """The requested model if this host runs it, else the cluster baseline over connected hosts."""
    if requested is not None:
        info = next((m for m in facts.cpu_models if m.name == requested), None)
        if info is None and requested not in NOT_A_BASELINE:
            raise NotFoundError(
                f"CPU model {requested!r} is not known to host {host.name}.",
                hint="Leave cpu_model empty to use the cluster baseline.",
            )
        if info is not None and not info.runnable:
            raise CapacityError(
                f"Host {host.name} cannot run CPU model {requested!r}: it lacks "
                f"{', '.join(info.unavailable_features[:6])}.",
                hint="Leave cpu_model empty to use the cluster baseline.",
            )
        return requested
    peers = [
        h for h in host.cluster.hosts if h.connection_state is ConnectionState.CONNECTED or h.id == host.id
    ]
    peer_facts = [host_facts(h) for h in peers]
    return choose_baseline([f.cpu_models for f in peer_facts], [f.cpu_vendor for f in peer_facts])


def create_vm_row(s: Session, req: VmCreate, rng: random.Random | None = None,
                  imported: ImportedParts | None = None) -> VmRow:
    """Validate ``req`` and add the VM with its MAC/IP allocations to the caller's transaction."""
    if s.scalar(select(VmRow).where(VmRow.name == req.name)) is not None:
        raise ConflictError(f"A VM named {req.name!r} already exists.", hint="Choose another name.")
    warning = None
    if req.host is not None:
        host = get_host(s, req.host)
        check_host_usable(host)
    else:
        host, warning = place_new_vm(s, req)
    ds = check_datastore(s, host, req.datastore)
    nets = _check_networks(s, host, req.name, req.networks)
    _check_boot_options(req)
    image_mib = None
    disks: list[DiskSpec] = []
    if imported is not None:
        disks = _imported_disks(host, ds, imported)
    elif req.disk_image is not None:
        image_mib = _check_disk_image(host, ds, req.disk_image)
    else:
        _check_image(host, ds, req.image)
    facts = host_facts(host)
    if req.memory_mib > facts.memory_total_mib:
        raise CapacityError(
            f"VM memory {req.memory_mib} MiB is more than host {host.name}'s total of "
            f"{facts.memory_total_mib} MiB.",
            hint="Ask for less memory or choose a larger host.",
        )
    if req.cpus > facts.cpus:
        raise CapacityError(
            f"VM needs {req.cpus} vCPUs but host {host.name} has {facts.cpus} CPUs.",
            hint="Ask for fewer vCPUs.",
        )
    cpu_model = choose_cpu_model(host, facts, req.cpu_model)
    machine = resolve_machine_type(req.machine_type, facts.machine_types, facts.default_machine_type)

    used_macs = set(s.scalars(select(MacAllocationRow.mac)))
    nics: list[NicSpec] = []
    ips: list[tuple[NetworkRow, str]] = []
    for i, net in enumerate(nets):
        mac = _mac(used_macs, imported.macs[i] if imported is not None else None, i, rng)
        used_macs.add(mac)
        nics.append(NicSpec(network=net.name, mac=mac))
        if net.pool_cidr and net.pool_first and net.pool_last:
            used_ips = list(
                s.scalars(select(IpAllocationRow.address).where(IpAllocationRow.network_id == net.id))
            )
            ips.append((net, allocate_ip(net.pool_cidr, net.pool_first, net.pool_last, used_ips)))
    vm_uuid = str(uuid.uuid4())
    cmdline = req.kernel_args.strip()
    seed = None
    if req.disk_image is not None:
        boot = BootSpec(kind=BootKind.DISK, image=req.disk_image)
        seed = SeedSpec(instance_id=vm_uuid, hostname=req.name, mac=nics[0].mac if nics else None,
                        address=prefixed(ips[0][1], ips[0][0].pool_cidr or "") if ips else None,
                        ssh_keys=list(req.ssh_keys))
    else:
        if ips:
            net0, addr0 = ips[0]
            cmdline = f"{cmdline} {ip_kernel_arg(addr0, net0.pool_cidr or '')}".strip()
        boot = BootSpec(kind=BootKind.KERNEL, image=req.image, cmdline=cmdline)
    spec = VmSpec(
        name=req.name,
        uuid=vm_uuid,
        cpus=req.cpus,
        memory_mib=req.memory_mib,
        cpu_model=cpu_model,
        machine_type=machine,
        datastore=ds.name,
        disks=disks if imported is not None else _disks(req, ds, image_mib),
        nics=nics,
        boot=boot,
        seed=seed,
    )
    vm = VmRow(
        name=spec.name,
        uuid=spec.uuid,
        host_id=host.id,
        spec=spec.model_dump(mode="json"),
        power_state=PowerState.POWERED_OFF,
        ip=ips[0][1] if ips else None,
        image=req.disk_image or req.image,
        kernel_args=req.kernel_args,
        stats={},
    )
    s.add(vm)
    s.flush()
    for nic in nics:
        s.add(MacAllocationRow(mac=nic.mac, vm_id=vm.id))
    for net, addr in ips:
        s.add(IpAllocationRow(network_id=net.id, address=addr, vm_id=vm.id))
    s.flush()
    record_event(
        s,
        EventKind.VM_CREATED,
        vm.name,
        f"VM {vm.name} registered on host {host.name} (CPU {cpu_model}, machine {machine}"
        f"{', IP ' + vm.ip if vm.ip else ''}){' by initial placement' if req.host is None else ''}."
        f"{' ' + warning if warning else ''}",
    )
    return vm
