"""HTTP routes of disk moves on the source agent (docs/design/contracts.md, "Disk moves")."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request

from vmshift.agent.config import AgentConfig
from vmshift.agent.datastores import Datastores
from vmshift.agent.moves.jobs import MoveContext, MoveJobs
from vmshift.agent.moves.store import MoveStore
from vmshift.agent.supervisor import Supervisor
from vmshift.model.inputs import ObjectId
from vmshift.model.moves import DiskMoveRequest, MoveProgress


async def start_moves(app: FastAPI, config: AgentConfig, supervisor: Supervisor,
                      datastores: Datastores) -> MoveJobs:
    """Build the registry in the app's lifespan and resume (roll back or finish) unfinished moves."""
    moves = MoveJobs(MoveContext(supervisor, supervisor.files, datastores, config.qemu_img),
                     MoveStore(config.state_dir))
    app.state.moves = moves
    await moves.resume_all()
    return moves


def _moves(request: Request) -> MoveJobs:
    moves: MoveJobs = request.app.state.moves
    return moves


Moves = Annotated[MoveJobs, Depends(_moves)]
router = APIRouter(prefix="/api/v1")


@router.post("/moves")
async def move_start(body: DiskMoveRequest, moves: Moves) -> MoveProgress:
    return await moves.start(body)


@router.get("/moves/{move_id}")
async def move_progress(move_id: ObjectId, moves: Moves) -> MoveProgress:
    return moves.get(move_id)


@router.post("/moves/{move_id}/cancel")
async def move_cancel(move_id: ObjectId, moves: Moves) -> MoveProgress:
    return await moves.cancel(move_id)
