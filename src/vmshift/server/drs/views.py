"""What the DRS routes answer (docs/drs.md)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from vmshift.model.base import RequestModel
from vmshift.model.inputs import HostName
from vmshift.placement.recommendation import MoveReason, RecommendationState
from vmshift.placement.snapshot import DrsAutomation, VmDrs


class DrsRecommendationView(BaseModel):
    id: int
    cluster: str
    vm: str
    source_host: str
    target_host: str
    reason: MoveReason
    why: str = Field(description="one sentence: why the move is recommended")
    benefit: float = Field(description="how much the objective drops over the history window")
    cost: float = Field(description="the move's cost in the same units, from its predicted time and downtime")
    predicted_s: float
    downtime_ms: int
    state: RecommendationState
    created_at: datetime
    decided_at: datetime | None = None
    migration_id: int | None = None
    task_id: int | None = None


class DrsPassView(BaseModel):
    """One DRS pass over a cluster: what it recommended or applied, and why (not)."""

    cluster: str
    automation: DrsAutomation
    threshold: int
    imbalance_before: float
    imbalance_after: float = Field(description="predicted, once the recommended moves are made")
    tolerance: float
    recommendations: list[DrsRecommendationView]
    applied: list[int] = Field(default_factory=list, description="recommendations started as migrations")
    notes: list[str] = Field(default_factory=list, description="why moves were or were not made")


class VmDrsUpdate(RequestModel):
    drs: VmDrs = Field(description="cluster: follow the cluster; disabled: never moved by DRS")


#: ``--add-vm``'s SPEC (server/drs/what_if.py parses it): NAME:CPUS:MEMORY_MIB[:CORES_BUSY]
ADD_VM_PATTERN = (r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}:[1-9][0-9]{0,2}:[1-9][0-9]{0,6}"
                  r"(:[0-9]{1,3}(\.[0-9]{1,3})?)?$")


class SimulateRemoveHost(RequestModel):
    remove_host: HostName = Field(description="what DRS would do without this host")


class SimulateAddVm(RequestModel):
    add_vm: str = Field(pattern=ADD_VM_PATTERN, description="a VM to add: NAME:CPUS:MEMORY_MIB[:CORES_BUSY]")


#: ``drs simulate``'s body: exactly one of the two (the schema says so: each forbids other fields)
DrsSimulateRequest = SimulateRemoveHost | SimulateAddVm


class ClusterDrsUpdate(RequestModel):
    """``vmshift cluster set CLUSTER --drs LEVEL --drs-threshold N`` (PATCH: only the fields sent)."""

    automation: DrsAutomation | None = Field(default=None, description="manual, partially or fully")
    threshold: int | None = Field(default=None, ge=1, le=5,
                                  description="1 = only moves that mend must rules .. 5 = balance the most")


class ClusterDrsView(BaseModel):
    cluster: str
    automation: DrsAutomation
    threshold: int


class VmDrsView(BaseModel):
    vm: str
    drs: VmDrs


class WhatIfView(BaseModel):
    """``drs simulate``: the change's own moves (evacuated or placed VMs), then DRS's pass."""

    cluster: str
    placed: dict[str, str] = Field(description="VM -> host: the removed host's VMs, or the new VM")
    refused: str | None = Field(default=None, description="why the change itself is impossible")
    recommendations: list[DrsMoveView] = Field(default_factory=list)
    imbalance_before: float | None = None
    imbalance_after: float | None = None
    notes: list[str] = Field(default_factory=list)


class DrsMoveView(BaseModel):
    """A move DRS would make (a what-if's: not stored)."""

    vm: str
    source_host: str
    target_host: str
    reason: MoveReason
    why: str
    benefit: float
    cost: float
    predicted_s: float
    downtime_ms: int


WhatIfView.model_rebuild()
