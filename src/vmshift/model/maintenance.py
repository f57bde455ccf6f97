"""Maintenance mode as the API answers it (docs/drs.md, "Maintenance mode")."""

from __future__ import annotations

from pydantic import BaseModel, Field

from vmshift.model.base import RequestModel


class EvacuationMove(BaseModel):
    vm: str
    target: str
    live: bool = Field(description="a live migration; else the powered-off VM is moved cold")
    predicted_s: float = Field(description="the migration estimator's predicted time of this move")
    downtime_ms: int
    ends_at_s: float = Field(description="when it should end, from the start, within the concurrency limits")
    warning: str | None = Field(default=None, description="a should rule this move breaks")


class EvacuationPlanView(BaseModel):
    """Where each VM of the host goes; ``refused`` says why the host cannot enter maintenance."""

    host: str
    moves: list[EvacuationMove]
    predicted_total_s: float
    refused: str | None = None


class MaintenanceExit(RequestModel):
    return_vms: bool = Field(default=False, description="move back the VMs its last evacuation moved away")
