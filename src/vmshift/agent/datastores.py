"""Datastores (directories with a UUID marker) and the images stored on them.

An iSCSI datastore is a directory too (its marker says ``"type": "iscsi"`` with the target's portal,
IQN and storage role): it holds the VMs' folders (vm.json, serial log, seed), while each disk is a
LUN on the target (agent/iscsi_disks.py).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from vmshift.agent.share_proof import ShareProof, has_peers
from vmshift.errors import NotFoundError
from vmshift.model.enums import BootKind, DatastoreKind
from vmshift.model.host import DatastoreInfo
from vmshift.qemu.cmdline import KernelBoot

log = logging.getLogger(__name__)

MARKER_FILE = ".vmshift-datastore.json"
IMAGES_DIR = "images"


@dataclass(frozen=True)
class Image:
    """``DATASTORE/images/NAME/image.json``; file names in it are relative to its folder."""

    name: str
    kind: BootKind
    folder: Path
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    disk: Path | None = None
    disk_size_mib: int = 0  # the disk's virtual size, recorded when the image was built or imported

    def disk_file(self) -> Path:
        """The image's disk (NotFoundError if it names none or the file is gone)."""
        if self.disk is None or not self.disk.is_file():
            raise NotFoundError(f"Image {self.name!r} has no disk at {self.disk or self.folder}.",
                                hint="Import a disk image (vmshift image import) or name its 'disk' in "
                                     "image.json.")
        return self.disk

    def kernel_boot(self) -> KernelBoot:
        if self.kernel is None:
            raise NotFoundError(f"Image {self.name!r} has no kernel to boot.",
                                hint="Use a kernel image, or boot the VM from its disk.")
        return KernelBoot(kernel=self.kernel, initrd=self.initrd, cmdline=self.cmdline)


@dataclass(frozen=True)
class IscsiTarget:
    """Where an iSCSI datastore's LUNs are: the portal and IQN QEMU logs in to, and the storage
    role's URL that makes and removes them."""

    portal: str
    target: str
    storage_role: str


@dataclass(frozen=True)
class Datastore:
    uuid: str
    name: str
    path: Path
    iscsi: IscsiTarget | None = None

    @property
    def kind(self) -> DatastoreKind:
        return DatastoreKind.DIRECTORY if self.iscsi is None else DatastoreKind.ISCSI

    def images(self) -> list[Image]:
        found: list[Image] = []
        for meta in sorted((self.path / IMAGES_DIR).glob("*/image.json")):
            try:
                found.append(read_image(meta))
            except (OSError, ValueError, KeyError) as exc:
                log.warning("ignoring image %s: %s", meta, exc)
        return found

    def image(self, name: str) -> Image:
        meta = self.path / IMAGES_DIR / name / "image.json"
        if not meta.is_file():
            raise NotFoundError(f"Image {name!r} is not on datastore {self.name!r}.",
                                hint=f"Put it in {meta.parent} (see docs/agent.md).")
        try:
            return read_image(meta)
        except (OSError, ValueError, KeyError) as exc:
            raise NotFoundError(f"Image {name!r} on datastore {self.name!r} is unreadable ({exc}).",
                                hint=f"Fix {meta}.") from exc

    def info(self) -> DatastoreInfo:
        usage = shutil.disk_usage(self.path)
        images = self.images()
        return DatastoreInfo(uuid=self.uuid, name=self.name, path=str(self.path),
                             capacity_mib=usage.total >> 20, free_mib=usage.free >> 20, kind=self.kind,
                             portal=self.iscsi.portal if self.iscsi else "",
                             target=self.iscsi.target if self.iscsi else "",
                             images=[i.name for i in images],
                             disk_images={i.name: i.disk_size_mib for i in images
                                          if i.kind is BootKind.DISK and i.disk is not None})


def read_image(meta: Path) -> Image:
    data = json.loads(meta.read_text())
    folder = meta.parent

    def rel(key: str) -> Path | None:
        value = data.get(key)
        return folder / value if value else None

    return Image(name=str(data.get("name") or folder.name), kind=BootKind(data.get("kind", "kernel")),
                 folder=folder, kernel=rel("kernel"), initrd=rel("initrd"),
                 cmdline=str(data.get("cmdline", "")), disk=rel("disk"),
                 disk_size_mib=int(data.get("disk_size_mib", 0)))


def read_datastore(path: Path) -> Datastore | None:
    marker = path / MARKER_FILE
    try:
        data = json.loads(marker.read_text())
        kind = DatastoreKind(data.get("type", DatastoreKind.DIRECTORY))
        target = (IscsiTarget(portal=str(data["portal"]), target=str(data["target"]),
                              storage_role=str(data["storage_role"]))
                  if kind is DatastoreKind.ISCSI else None)
        return Datastore(uuid=str(data["uuid"]), name=str(data["name"]), path=path, iscsi=target)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s is not a datastore (no readable %s: %s)", path, MARKER_FILE, exc)
        return None


class Datastores:
    """The datastores of this host, rescanned on demand (markers can appear after start).

    ``host`` (the agent's name) turns on the sharing proof of directory datastores
    (agent/share_proof.py): without it nothing is written into them.
    """

    def __init__(self, paths: list[Path], host: str = "", proof_file: Path | None = None) -> None:
        self._paths = list(paths)
        self._proof = ShareProof(host, state_file=proof_file) if host else None

    def add_path(self, path: Path) -> None:
        if path not in self._paths:
            self._paths.append(path)

    def remove_path(self, path: Path) -> None:
        self._paths = [p for p in self._paths if p != path]

    def infos(self) -> list[DatastoreInfo]:
        """Every datastore as the facts report it, with the sharing proof of directory datastores
        (refreshed: this host's file written, the other hosts' read)."""
        out = []
        for ds in self.all():
            info = ds.info()
            if self._proof is not None and ds.iscsi is None:
                info.proof = self._proof.refresh(ds.path)
            out.append(info)
        return out

    def opens_direct(self, ds: Datastore) -> bool:
        """Whether VM disks on ``ds`` bypass the host's page cache: a directory datastore another
        host also uses (its file is there), so a migration's target never reads stale pages."""
        return self._proof is not None and ds.iscsi is None and has_peers(ds.path, self._proof.host)

    def all(self) -> list[Datastore]:
        found = [read_datastore(p) for p in self._paths]
        return [d for d in found if d is not None]

    def get(self, name: str) -> Datastore:
        for ds in self.all():
            if ds.name == name:
                return ds
        raise NotFoundError(f"Datastore {name!r} is not mounted on this host.",
                            hint="Add its directory to the agent's 'datastores' and create its marker.")

    def first_kernel(self) -> KernelBoot | None:
        for ds in self.all():
            for image in ds.images():
                if image.kernel is not None and image.kernel.exists():
                    return image.kernel_boot()
        return None
