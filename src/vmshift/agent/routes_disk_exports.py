"""HTTP routes of the target role of a disk move to another host (docs/design/contracts.md, "Disk moves").

The exports' manager is built on first use from the agent's state, so registering the router is
the only wiring the app needs.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from vmshift.agent.nbd_export import TargetExports
from vmshift.model.inputs import ObjectId
from vmshift.model.moves import DiskExportRequest, DiskExports

router = APIRouter(prefix="/api/v1")


def target_exports(request: Request) -> TargetExports:
    """The app's TargetExports (one per app: its lock serialises creates and deletes)."""
    exports: TargetExports | None = getattr(request.app.state, "disk_exports", None)
    if exports is None:
        agent = request.app.state.agent
        config = agent.config
        exports = TargetExports(agent.supervisor.files, config.state_dir, config.migration_address,
                                qemu_img=config.qemu_img)
        exports.log_orphans()
        request.app.state.disk_exports = exports
    return exports


Exports = Annotated[TargetExports, Depends(target_exports)]


@router.post("/disk-exports")
async def create_exports(body: DiskExportRequest, exports: Exports) -> DiskExports:
    return await exports.create(body)


@router.get("/disk-exports")
async def list_exports(exports: Exports) -> list[DiskExports]:
    """The moves whose disks this host exports now (or whose files it keeps until their DELETE)."""
    return [r.exports for r in exports.all() if r.exports is not None]


@router.delete("/disk-exports/{move_id}")
async def delete_exports(move_id: ObjectId, exports: Exports,
                         keep_files: Annotated[bool, Query()] = False) -> dict[str, int | bool]:
    """Idempotent: an unknown move answers ``found: false``."""
    found = await exports.delete(move_id, keep_files=keep_files)
    return {"move_id": move_id, "found": found, "keep_files": keep_files}
