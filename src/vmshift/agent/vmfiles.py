"""A VM's files: its folder on the home datastore, qcow2 disks, vm.json, and its run directory.

A VM is *defined on this host* when ``state_dir/vms/NAME/`` exists (the registration) and its
``DATASTORE/NAME/vm.json`` is readable. Shared datastores are seen by several hosts, so the
folder alone does not say which host owns the VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from pathlib import Path

from pydantic import ValidationError

from vmshift.agent.datastores import Datastore, Datastores, Image
from vmshift.agent.iscsi_disks import IscsiDisks, read_note
from vmshift.agent.seed_iso import write_seed_iso
from vmshift.errors import ConflictError, InvalidInputError, NotFoundError, QemuError
from vmshift.model.enums import BootKind, DiskFormat
from vmshift.model.vm import DiskSpec, VmSpec
from vmshift.qemu.cmdline import KernelBoot, VmPaths

SPEC_FILE = "vm.json"
HOME_FILE = "home.json"  # in the run dir: {"datastore": NAME}
INCOMING_FILE = "incoming.json"  # in the run dir while the VM is the target of a live migration
UNREADABLE_INCOMING_ID = 0  # an incoming mark whose id cannot be read (server ids start at 1)
MAX_SOCKET_PATH = 107


class VmFiles:
    def __init__(self, datastores: Datastores, state_dir: Path, qemu_img: str = "qemu-img",
                 iscsi: IscsiDisks | None = None) -> None:
        self.datastores = datastores
        self.vms_dir = state_dir / "vms"
        self.qemu_img = qemu_img
        self.iscsi = iscsi or IscsiDisks("", {})

    def run_dir(self, name: str) -> Path:
        return self.vms_dir / name

    def paths(self, spec: VmSpec) -> VmPaths:
        home = self.datastores.get(spec.datastore)
        stores = [self.datastores.get(d.datastore) for d in spec.disks]
        disks = [ds.path / spec.name / d.file for ds, d in zip(stores, spec.disks, strict=True)]
        luns = {i: lun for i, (ds, path) in enumerate(zip(stores, disks, strict=True))
                if ds.iscsi is not None and (lun := read_note(path, self.iscsi.initiator)) is not None}
        direct = frozenset(i for i, ds in enumerate(stores) if self.datastores.opens_direct(ds))
        return VmPaths(vm_dir=home.path / spec.name, run_dir=self.run_dir(spec.name), disks=disks, luns=luns,
                       direct=direct)

    def iscsi_disks(self, spec: VmSpec) -> list[tuple[Datastore, DiskSpec]]:
        """The VM's disks that are LUNs of iSCSI datastores, with their datastores."""
        return [(ds, d) for d in spec.disks if (ds := self.datastores.get(d.datastore)).iscsi is not None]

    def require_file_disks(self, spec: VmSpec, what: str) -> None:
        """Refuse ``what`` (a move that copies disk files to another host, or a cold one) for disks
        that are LUNs: only Storage vMotion (agent/moves/storage.py) moves a disk between a
        directory and an iSCSI datastore."""
        on_iscsi = sorted({ds.name for ds, _ in self.iscsi_disks(spec)})
        if on_iscsi:
            raise InvalidInputError(f"{what} cannot move VM {spec.name!r}: its disks would be on iSCSI "
                                    f"datastore {', '.join(on_iscsi)}, which keeps disks as LUNs, not files.",
                                    hint="Live-migrate it between hosts that see the datastore (no disk "
                                         "copy is needed), or move its disks with Storage vMotion "
                                         "(vm migrate --datastore) on one host first.")

    def missing_disks(self, spec: VmSpec) -> list[Path]:
        """Disk files this host does not see (a LUN's note is made on define: never missing)."""
        on_iscsi = {d.file for _, d in self.iscsi_disks(spec)}
        return [p for d, p in zip(spec.disks, self.paths(spec).disks, strict=True)
                if d.file not in on_iscsi and not p.exists()]

    async def attach_luns(self, spec: VmSpec, migration_id: int | None) -> None:
        """Hold the VM's LUNs read-write on this host (ConflictError: another host holds one)."""
        paths = self.paths(spec)
        for index, (disk, path) in enumerate(zip(spec.disks, paths.disks, strict=True)):
            ds = self.datastores.get(disk.datastore)
            if ds.iscsi is None:
                continue
            if index not in paths.luns:
                await self.iscsi.ensure(ds, spec, disk, path)
            await self.iscsi.attach(ds, spec, disk, migration_id)

    async def detach_luns(self, spec: VmSpec) -> None:
        for ds, disk in self.iscsi_disks(spec):
            await self.iscsi.detach(ds, spec, disk)

    async def remove_luns(self, spec: VmSpec) -> None:
        """Remove the VM's LUNs from their targets (on delete; the notes go with the folder)."""
        for ds, disk in self.iscsi_disks(spec):
            await self.iscsi.remove(ds, spec, disk)

    def kernel_boot(self, spec: VmSpec) -> KernelBoot | None:
        if spec.boot.kind is not BootKind.KERNEL:
            return None
        if not spec.boot.image:
            raise InvalidInputError(f"VM {spec.name!r} boots a kernel but names no image.",
                                    hint="Set boot.image to an image on the VM's datastore.")
        return self.datastores.get(spec.datastore).image(spec.boot.image).kernel_boot()

    def source_image(self, disk: DiskSpec) -> Image | None:
        """The image a disk is made from (its backing image, or the image a full clone copies), with a
        clear refusal when it is not on the disk's datastore or is smaller than the disk."""
        name = disk.backing_image or disk.clone_of
        if name is None:
            return None
        image = self.datastores.get(disk.datastore).image(name)
        image.disk_file()
        if image.disk_size_mib > disk.size_mib:
            raise InvalidInputError(f"Disk {disk.file!r} ({disk.size_mib} MiB) is smaller than image "
                                    f"{name!r} ({image.disk_size_mib} MiB) it is made from.",
                                    hint="Give the disk at least the image's size.")
        if disk.backing_image and disk.format is DiskFormat.RAW:
            raise InvalidInputError(f"Raw disk {disk.file!r} cannot be backed by an image.",
                                    hint="Use qcow2 for a disk made from an image, or a full clone.")
        return image

    def backing_files(self, spec: VmSpec) -> list[Path]:
        """The image disks that back the VM's disks (QEMU opens them read-only)."""
        return [image.disk_file() for d in spec.disks if d.backing_image
                and (image := self.source_image(d)) is not None]

    def ensure_seed(self, spec: VmSpec) -> None:
        """Make the VM's cloud-init seed ISO from its spec where it is missing (a new VM, or one whose
        folder moved to another datastore: the seed moves with the VM by being made again)."""
        if spec.seed is None:
            return
        iso = self.paths(spec).seed_iso
        if not iso.is_file():
            iso.parent.mkdir(parents=True, exist_ok=True)
            write_seed_iso(iso, spec.seed)

    def registered_names(self) -> list[str]:
        if not self.vms_dir.is_dir():
            return []
        return sorted(p.name for p in self.vms_dir.iterdir() if (p / HOME_FILE).is_file())

    def mark_incoming(self, name: str, migration_id: int) -> None:
        """The VM here only receives a live migration: not a normal VM of this host yet."""
        (self.run_dir(name) / INCOMING_FILE).write_text(json.dumps({"migration_id": migration_id}))

    def clear_incoming(self, name: str) -> None:
        (self.run_dir(name) / INCOMING_FILE).unlink(missing_ok=True)

    def is_incoming(self, name: str) -> bool:
        return (self.run_dir(name) / INCOMING_FILE).is_file()

    def incoming_migration(self, name: str) -> int | None:
        """The migration id of the VM's incoming mark, None if unmarked."""
        mark = self.run_dir(name) / INCOMING_FILE
        try:
            return int(json.loads(mark.read_text())["migration_id"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):  # being written, or damaged: still incoming
            return UNREADABLE_INCOMING_ID

    def unregister(self, name: str) -> None:
        """Forget the VM on this host (run dir and registration) but keep its folder and disks."""
        shutil.rmtree(self.run_dir(name), ignore_errors=True)

    def drop_host_folder(self, spec: VmSpec) -> None:
        """After the VM left this host: remove its folder when that is this host's own (an iSCSI
        datastore's folders are per host, its disks are LUNs that stay), so a later VM of the same
        name does not find a stale vm.json here."""
        with contextlib.suppress(NotFoundError):
            home = self.datastores.get(spec.datastore)
            if home.iscsi is not None:
                shutil.rmtree(home.path / spec.name, ignore_errors=True)

    def load_spec(self, name: str) -> VmSpec:
        """The spec of a VM registered here (NotFoundError if unregistered or its folder is gone)."""
        home_file = self.run_dir(name) / HOME_FILE
        try:
            home = json.loads(home_file.read_text())["datastore"]
        except (OSError, ValueError, KeyError) as exc:
            raise NotFoundError(f"VM {name!r} is not defined on this host.",
                                hint="Define it first with PUT /api/v1/vms/NAME.") from exc
        spec_file = self.datastores.get(home).path / name / SPEC_FILE
        try:
            return VmSpec.model_validate_json(spec_file.read_text())
        except (OSError, ValidationError) as exc:
            raise NotFoundError(f"VM {name!r} is registered but {spec_file} is missing or invalid.",
                                hint="Restore the VM's folder or delete the VM.") from exc

    def _check(self, spec: VmSpec, networks: dict[str, str]) -> VmPaths:
        paths = self.paths(spec)
        if len(str(paths.qmp_socket)) > MAX_SOCKET_PATH:
            raise InvalidInputError(f"The QMP socket path {paths.qmp_socket} is too long for a unix socket.",
                                    hint="Use a shorter VM name or agent state_dir.")
        for nic in spec.nics:
            if nic.network not in networks:
                raise NotFoundError(f"Network {nic.network!r} does not exist on this host.",
                                    hint=f"Known networks: {', '.join(sorted(networks)) or 'none'}.")
        files = [d.file for d in spec.disks]
        if len(set(files)) != len(files) or any("/" in f or f in ("", ".", "..", SPEC_FILE) for f in files):
            raise InvalidInputError(f"VM {spec.name!r} has duplicate or invalid disk file names.",
                                    hint="Use plain names like disk0.qcow2, each once.")
        self.kernel_boot(spec)
        for disk, path in zip(spec.disks, paths.disks, strict=True):
            ds = self.datastores.get(disk.datastore)
            if ds.iscsi is not None and (disk.backing_image or disk.clone_of):
                raise InvalidInputError(f"Disk {disk.file!r} cannot be made from an image on iSCSI "
                                        f"datastore {ds.name!r}.",
                                        hint="Give it an empty disk, or put it on a directory datastore.")
            if not path.exists():
                self.source_image(disk)
        return paths

    async def define(self, spec: VmSpec, networks: dict[str, str]) -> None:
        """Create or adopt the VM's folder, its missing disks, vm.json and the registration."""
        paths = self._check(spec, networks)
        spec_file = paths.vm_dir / SPEC_FILE
        if spec_file.exists():
            try:
                existing = VmSpec.model_validate_json(spec_file.read_text())
            except (OSError, ValidationError):
                existing = None
            if existing is not None and existing.uuid != spec.uuid:
                raise ConflictError(
                    f"A different VM named {spec.name!r} (uuid {existing.uuid}) already lives on "
                    f"datastore {spec.datastore!r}.", hint="Pick another name or delete that VM first.")
        paths.vm_dir.mkdir(parents=True, exist_ok=True)
        for disk, path in zip(spec.disks, paths.disks, strict=True):
            if path.exists():
                continue
            ds = self.datastores.get(disk.datastore)
            if ds.iscsi is not None:  # the LUN named after the VM and disk: found, or made now
                await self.iscsi.ensure(ds, spec, disk, path)
                continue
            image = self.source_image(disk)
            path.parent.mkdir(parents=True, exist_ok=True)
            if image is not None and disk.clone_of:
                await full_clone(self.qemu_img, image.disk_file(), path, disk)
            elif disk.format is DiskFormat.RAW:
                await _run(self.qemu_img, "create", "-q", "-f", "raw", str(path), f"{disk.size_mib}M")
            else:
                await create_qcow2(self.qemu_img, path, disk.size_mib,
                                   image.disk_file() if image is not None else None)
        self.ensure_seed(spec)
        tmp = spec_file.with_suffix(".tmp")
        tmp.write_text(spec.model_dump_json(indent=2))
        tmp.replace(spec_file)
        paths.run_dir.mkdir(parents=True, exist_ok=True)
        (paths.run_dir / HOME_FILE).write_text(json.dumps({"datastore": spec.datastore}))

    def switch_home(self, spec: VmSpec) -> None:
        """Make ``spec`` the VM's definition here, at its (possibly new) home datastore, without
        touching disks: ``vm.json`` in the new folder first, then ``home.json`` (each written whole
        and renamed), so an agent that restarts in between finds one complete definition or the other.
        Used when a running VM's files moved (Storage vMotion)."""
        paths = self.paths(spec)
        paths.vm_dir.mkdir(parents=True, exist_ok=True)
        spec_file = paths.vm_dir / SPEC_FILE
        tmp = spec_file.with_suffix(".tmp")
        tmp.write_text(spec.model_dump_json(indent=2))
        tmp.replace(spec_file)
        home = paths.run_dir / HOME_FILE
        tmp_home = home.with_suffix(".tmp")
        tmp_home.write_text(json.dumps({"datastore": spec.datastore}))
        tmp_home.replace(home)

    def remove(self, spec: VmSpec) -> None:
        """Delete the VM's folders (home and disk datastores) and its registration."""
        paths = self.paths(spec)
        for disk in paths.disks:
            disk.unlink(missing_ok=True)
            if disk.parent != paths.vm_dir and disk.parent.is_dir() and not any(disk.parent.iterdir()):
                disk.parent.rmdir()
        shutil.rmtree(paths.vm_dir, ignore_errors=True)
        shutil.rmtree(paths.run_dir, ignore_errors=True)


async def _run(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    text = out.decode(errors="replace").strip()
    if proc.returncode != 0:
        raise QemuError(f"{Path(argv[0]).name} failed: {text[:300]}.",
                        hint="Check the datastore's free space and permissions.")
    return text


async def create_qcow2(qemu_img: str, path: Path, size_mib: int, backing: Path | None) -> None:
    """A new qcow2; with ``backing`` an overlay of it (a linked clone), named relative to the overlay's
    folder, so the chain holds wherever the datastore is mounted (a shared datastore may be mounted at
    different paths on different hosts)."""
    argv = [qemu_img, "create", "-q", "-f", "qcow2"]
    if backing is not None:
        info = json.loads(await _run(qemu_img, "info", "--output=json", "-U", str(backing)))
        argv += ["-b", os.path.relpath(backing, path.parent), "-F", str(info.get("format", "qcow2"))]
    await _run(*argv, str(path), f"{size_mib}M")


async def full_clone(qemu_img: str, source: Path, path: Path, disk: DiskSpec) -> None:
    """A whole copy of an image's disk (a full clone), grown to the disk's size; written under a
    temporary name and renamed, so a copy cut short is never taken for the disk."""
    tmp = path.with_name(f".{path.name}.clone")
    try:
        await _run(qemu_img, "convert", "-q", "-U", "-O", disk.format.value, str(source), str(tmp))
        await _run(qemu_img, "resize", "-q", "-f", disk.format.value, str(tmp), f"{disk.size_mib}M")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
