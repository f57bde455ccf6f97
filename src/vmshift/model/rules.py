"""Affinity rules as the API takes and returns them (docs/drs.md, "Rules").

A rule belongs to one cluster; its name is unique there. The placement engine's ``Rule`` checks
that the kind and the names given go together (a VM-host rule names hosts, a VM-VM rule none).
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from vmshift.model.base import RequestModel
from vmshift.model.inputs import ClusterName, HostName, Name, VmName
from vmshift.model.placement import RuleKind, RuleStrength

MAX_RULE_MEMBERS = 1000  # VMs (or hosts) one rule may name


class RuleCreate(RequestModel):
    """Body of ``POST /rules``."""

    name: Name
    cluster: ClusterName
    kind: RuleKind
    strength: RuleStrength = Field(
        default=RuleStrength.MUST, description="must: never broken; should: broken only when nothing fits"
    )
    vms: list[VmName] = Field(min_length=1, max_length=MAX_RULE_MEMBERS)
    hosts: list[HostName] = Field(default_factory=list, max_length=MAX_RULE_MEMBERS,
                                  description="the VM-host kinds only")


class RuleView(BaseModel):
    id: int
    name: str
    cluster: str
    kind: RuleKind
    strength: RuleStrength
    vms: list[str]
    hosts: list[str]
    created_at: datetime
