"""A hypervisor host's side of iSCSI datastores: the storage role's client and the LUN notes.

A disk on an iSCSI datastore has, in its VM folder, a small JSON note in place of the disk file
(same name) saying which LUN of which target holds it. The note is made by asking the storage
role for the LUN named after the VM's UUID and the disk's file (made if new), so every host that
defines the VM (the target of a migration too) finds the same LUN.

Before a QEMU opens the LUNs, the agent attaches them (the storage role admits this host's
initiator name to the target and records the host as the LUN's read-write holder); when the QEMU
ends, it detaches them. The storage role refuses a second holder outside a live migration.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx

from vmshift.agent.datastores import Datastore, IscsiTarget
from vmshift.errors import ApiError, ConflictError, InvalidInputError, NotFoundError, StorageError
from vmshift.model import iscsi
from vmshift.model.iscsi import IscsiLun, LunInfo
from vmshift.model.vm import DiskSpec, VmSpec

log = logging.getLogger(__name__)
REQUEST_TIMEOUT_S = 30.0


def read_note(path: Path, initiator: str) -> IscsiLun | None:
    """The LUN a disk note names (None when there is no readable note)."""
    try:
        data = json.loads(path.read_text())
        return IscsiLun(portal=str(data["portal"]), target=str(data["target"]), lun=int(data["lun"]),
                        initiator=initiator)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _raise_for(r: httpx.Response, what: str) -> None:
    if r.status_code < 300:
        return
    try:
        err = r.json()["error"]
        message, hint = str(err.get("message")), err.get("hint")
    except (ValueError, KeyError, TypeError):
        message, hint = r.text[:300], None
    if r.status_code == 409:
        raise ConflictError(message, hint=hint)
    if r.status_code == 404:
        raise NotFoundError(message, hint=hint)
    raise ApiError(f"{what}: {message}", status=r.status_code, hint=hint)


class IscsiDisks:
    def __init__(self, host: str, token_files: dict[str, Path]) -> None:
        self.host = host
        self.initiator = iscsi.initiator_name(host)
        self.token_files = dict(token_files)

    async def _call(self, ds: Datastore, method: str, path: str, body: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
        target = _target(ds)
        token_file = self.token_files.get(ds.name)
        if token_file is None:
            raise StorageError(f"This host has no token for the storage role of datastore {ds.name!r}.",
                               hint="Name its token file under 'storage_role_tokens' in the agent config.")
        try:
            token = token_file.read_text().strip()
            async with httpx.AsyncClient(base_url=f"{target.storage_role}/api/v1", trust_env=False,
                                         timeout=REQUEST_TIMEOUT_S,
                                         headers={"Authorization": f"Bearer {token}"}) as http:
                r = await http.request(method, path, json=body)
        except (OSError, httpx.HTTPError) as exc:
            raise StorageError(f"The storage role of datastore {ds.name!r} at {target.storage_role} "
                               f"did not answer: {exc}.",
                               hint="Check that it runs on the storage host and that this host reaches it."
                               ) from exc
        _raise_for(r, f"The storage role of datastore {ds.name!r}")
        result: dict[str, Any] = r.json()
        return result

    async def ensure(self, ds: Datastore, spec: VmSpec, disk: DiskSpec, note: Path) -> IscsiLun:
        """The disk's LUN (made if it is new) and its note in the VM folder."""
        if disk.backing_image or disk.clone_of:
            raise InvalidInputError(f"Disk {disk.file!r} of VM {spec.name!r} cannot be made from an image on "
                               f"iSCSI datastore {ds.name!r} yet.",
                               hint="Give it an empty disk, or put it on a directory datastore.")
        lun = LunInfo.model_validate(await self._call(
            ds, "POST", "/luns", {"key": iscsi.lun_key(spec.uuid, disk.file), "size_mib": disk.size_mib,
                                  "format": disk.format.value}))
        target = _target(ds)
        note.parent.mkdir(parents=True, exist_ok=True)
        tmp = note.with_name(f".{note.name}.tmp")
        tmp.write_text(json.dumps({"portal": target.portal, "target": target.target, "lun": lun.lun,
                                   "key": lun.key, "format": disk.format.value}) + "\n")
        tmp.replace(note)
        return IscsiLun(portal=target.portal, target=target.target, lun=lun.lun, initiator=self.initiator)

    async def remove(self, ds: Datastore, spec: VmSpec, disk: DiskSpec) -> None:
        """Remove the disk's LUN; a LUN another host holds (the VM runs there: this host only had
        a stale definition of it) is kept, with a warning."""
        try:
            await self._call(ds, "DELETE", f"/luns/{spec.uuid}/{disk.file}?host={self.host}")
        except ConflictError as exc:
            log.warning("VM %s: its disk %s stays: %s", spec.name, disk.file, exc)

    async def attach(self, ds: Datastore, spec: VmSpec, disk: DiskSpec, migration_id: int | None) -> None:
        await self._call(ds, "POST", f"/luns/{spec.uuid}/{disk.file}/attach",
                         {"host": self.host, "initiator": self.initiator, "migration_id": migration_id})

    async def detach(self, ds: Datastore, spec: VmSpec, disk: DiskSpec) -> None:
        await self._call(ds, "POST", f"/luns/{spec.uuid}/{disk.file}/detach", {"host": self.host})


def _target(ds: Datastore) -> IscsiTarget:
    if ds.iscsi is None:
        raise ValueError(f"datastore {ds.name} is not an iSCSI datastore")
    return ds.iscsi

