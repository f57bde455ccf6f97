"""The storage role: a small HTTP service beside tgtd that makes, sizes, admits and removes one
LUN per VM disk of an iSCSI datastore (as Proxmox manages LUNs on a storage box).

Why a service of its own and not a hypervisor agent's job: tgtd is driven through a local control
socket (``tgtadm``) on the storage host, and the one-writer rule of a LUN needs one place that sees
every host's attachments. Hypervisor agents call it (agent/iscsi_disks.py); its record
(``state_dir/luns.json``) is the truth it replays into tgtd, which keeps its own only in memory.

Run: ``python -m vmshift.agent.storage_role --config FILE`` (docs/datastores.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI
from pydantic import BaseModel

from vmshift.agent.tgt import Tgtadm
from vmshift.errors import ConflictError, InvalidInputError, NotFoundError, StorageError, VmshiftError
from vmshift.http_edge import bearer_auth, install_error_handlers
from vmshift.model import iscsi
from vmshift.model.enums import DiskFormat
from vmshift.model.iscsi import AttachRequest, DetachRequest, LunCreate, LunInfo, TargetInfo

log = logging.getLogger(__name__)
RECORD_FILE = "luns.json"
LUNS_DIR = "luns"


@dataclass(frozen=True)
class StorageRoleConfig:
    listen: str
    portal: str
    target: str
    state_dir: Path
    token_file: Path
    tgt_control_port: int = 0

    @classmethod
    def load(cls, path: Path) -> StorageRoleConfig:
        try:
            data = json.loads(path.read_text())
            cfg = cls(listen=str(data["listen"]), portal=str(data["portal"]), target=str(data["target"]),
                      state_dir=Path(data["state_dir"]), token_file=Path(data["token_file"]),
                      tgt_control_port=int(data.get("tgt_control_port", 0)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidInputError(f"The storage role config {path} is not valid ({exc}).",
                                    hint="See docs/datastores.md for its keys.") from exc
        if not iscsi.valid_iqn(cfg.target):
            raise InvalidInputError(f"{cfg.target!r} is not an iSCSI qualified name.",
                                    hint="Use iqn.YYYY-MM.reversed.domain:name.")
        return cfg


class _Record(BaseModel):
    luns: list[LunInfo] = []


class LunStore:
    """The LUNs of the target: record, backing files and tgtd kept in step, one change at a time."""

    def __init__(self, config: StorageRoleConfig, tgt: Tgtadm) -> None:
        self.config = config
        self.tgt = tgt
        self.lock = asyncio.Lock()
        self.path = config.state_dir / RECORD_FILE
        self.files = config.state_dir / LUNS_DIR
        self.luns: dict[str, LunInfo] = {}
        if self.path.is_file():
            self.luns = {lun.key: lun for lun in _Record.model_validate_json(self.path.read_text()).luns}

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(_Record(luns=list(self.luns.values())).model_dump_json(indent=2))
        tmp.replace(self.path)

    def backing(self, lun: int) -> Path:
        return self.files / f"lun{lun}.img"

    async def replay(self) -> None:
        """Put the record back into tgtd (after a start or a restart of tgtd)."""
        self.files.mkdir(parents=True, exist_ok=True)
        await self.tgt.ensure_target(self.config.target)
        for lun in self.luns.values():
            await self.tgt.add_lun(lun.lun, str(self.backing(lun.lun)))
            for a in lun.attachments:
                await self.tgt.bind(a.initiator)

    def info(self) -> TargetInfo:
        usage = shutil.disk_usage(self.config.state_dir)
        return TargetInfo(target=self.config.target, portal=self.config.portal,
                          capacity_mib=usage.total >> 20, free_mib=usage.free >> 20,
                          luns=sorted(self.luns.values(), key=lambda x: x.lun))

    def get(self, key: str) -> LunInfo:
        lun = self.luns.get(key)
        if lun is None:
            raise NotFoundError(f"There is no LUN {key!r} on target {self.config.target}.",
                                hint="Create the VM's disk first.")
        return lun

    async def create(self, req: LunCreate) -> LunInfo:
        """The LUN named ``req.key``, made (sparse, ``size_mib``) if it does not exist yet."""
        async with self.lock:
            if (found := self.luns.get(req.key)) is not None:
                return found
            number = iscsi.next_lun({x.lun for x in self.luns.values()})
            backing = self.backing(number)
            free_mib = shutil.disk_usage(self.config.state_dir).free >> 20
            if req.size_mib > free_mib:
                raise InvalidInputError(f"A {req.size_mib} MiB LUN does not fit: {free_mib} MiB are free "
                                        "on the storage host.", hint="Make the disk smaller.")
            try:
                await _make_backing(backing, req)
                await self.tgt.add_lun(number, str(backing))
            except VmshiftError:
                backing.unlink(missing_ok=True)
                raise
            lun = LunInfo(key=req.key, lun=number, size_mib=req.size_mib, format=req.format)
            self.luns[req.key] = lun
            self._save()
            log.info("created LUN %d (%s, %d MiB)", number, req.key, req.size_mib)
            return lun

    async def delete(self, key: str, host: str | None) -> None:
        """Remove the LUN, unless a host other than ``host`` holds it (its VM runs there)."""
        async with self.lock:
            lun = self.luns.get(key)
            if lun is None:
                return
            holders = [a.host for a in lun.attachments if a.host != host]
            if holders:
                raise ConflictError(f"LUN {lun.lun} ({key}) is attached on {', '.join(holders)}: it is not "
                                    "removed.", hint="Delete the VM where it runs.")
            await self.tgt.delete_lun(lun.lun)
            self.backing(lun.lun).unlink(missing_ok=True)
            del self.luns[key]
            self._save()
            log.info("removed LUN %d (%s)", lun.lun, key)

    async def attach(self, key: str, req: AttachRequest) -> LunInfo:
        async with self.lock:
            lun = self.get(key)
            attachments = iscsi.attach(lun, req)  # ConflictError: held read-write elsewhere
            await self.tgt.bind(req.initiator)
            lun = lun.model_copy(update={"attachments": attachments})
            self.luns[key] = lun
            self._save()
            return lun

    async def detach(self, key: str, req: DetachRequest) -> LunInfo:
        async with self.lock:
            lun = self.get(key)
            lun = lun.model_copy(update={"attachments": iscsi.detach(lun, req.host)})
            self.luns[key] = lun
            self._save()
            return lun


async def _make_backing(path: Path, req: LunCreate) -> None:
    """A sparse file of the disk's size; a qcow2 one with its metadata preallocated, so the image
    never grows past the size tgtd gave the LUN when it was added."""
    if req.format is DiskFormat.RAW:
        with open(path, "wb") as f:
            f.truncate(req.size_mib << 20)
        return
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(path),
        f"{req.size_mib}M", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise StorageError(f"qemu-img could not make the LUN's file: {out.decode(errors='replace')[:300]}",
                           hint="Check the storage host's free space.")


def create_app(config: StorageRoleConfig, tgt: Tgtadm | None = None) -> FastAPI:
    store = LunStore(config, tgt or Tgtadm(config.tgt_control_port))
    token = config.token_file.read_text().strip()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await store.replay()
        yield

    auth = bearer_auth(token, hint_missing="Send the storage role's token (its token_file).",
                       hint_wrong="Use the token in the storage role's token_file.")
    app = FastAPI(title="vmshift storage role", lifespan=lifespan, dependencies=[Depends(auth)])
    install_error_handlers(app, what="storage role", api_doc_hint="See docs/datastores.md.")

    @app.get("/api/v1/target")
    async def target() -> TargetInfo:
        return store.info()

    @app.post("/api/v1/luns")
    async def create_lun(req: LunCreate) -> LunInfo:
        return await store.create(req)

    @app.get("/api/v1/luns/{vm_uuid}/{disk}")
    async def get_lun(vm_uuid: str, disk: str) -> LunInfo:
        return store.get(iscsi.lun_key(vm_uuid, disk))

    @app.delete("/api/v1/luns/{vm_uuid}/{disk}")
    async def delete_lun(vm_uuid: str, disk: str, host: str | None = None) -> dict[str, Any]:
        await store.delete(iscsi.lun_key(vm_uuid, disk), host)
        return {"deleted": True}

    @app.post("/api/v1/luns/{vm_uuid}/{disk}/attach")
    async def attach_lun(vm_uuid: str, disk: str, req: AttachRequest) -> LunInfo:
        return await store.attach(iscsi.lun_key(vm_uuid, disk), req)

    @app.post("/api/v1/luns/{vm_uuid}/{disk}/detach")
    async def detach_lun(vm_uuid: str, disk: str, req: DetachRequest) -> LunInfo:
        return await store.detach(iscsi.lun_key(vm_uuid, disk), req)

    return app


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vmshift-storage-role", description="vmshift iSCSI storage role")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    os.umask(0o077)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = StorageRoleConfig.load(args.config)
        app = create_app(config)
    except (VmshiftError, OSError) as exc:
        print(f"vmshift storage role: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    host, _, port = config.listen.rpartition(":")
    uvicorn.run(app, host=host, port=int(port), log_level=args.log_level, access_log=False)


if __name__ == "__main__":
    run()
