"""The placement engine's settings as the inventory stores them and the API sends them (issue 11).

The pure engine (``vmshift.placement``) reads them from its snapshot; they live here, in the bottom
layer, so the database schema and the API models can name them without importing the engine.
"""

from __future__ import annotations

from enum import StrEnum


class DrsAutomation(StrEnum):
    """A cluster's automation level (vSphere's names)."""

    MANUAL = "manual"  # every move is a recommendation, applied or dismissed one by one
    PARTIALLY = "partially"  # initial placement is automatic; balancing moves are recommendations
    FULLY = "fully"  # balancing moves are applied as ordinary migration tasks


class VmDrs(StrEnum):
    """A VM's own DRS setting; ``CLUSTER`` follows the cluster's level."""

    CLUSTER = "cluster"
    DISABLED = "disabled"  # DRS never moves it (maintenance mode still evacuates it)
    MANUAL = "manual"
    FULLY = "fully"


class RuleKind(StrEnum):
    VM_AFFINITY = "vm_affinity"  # the VMs run on one host
    VM_ANTI_AFFINITY = "vm_anti_affinity"  # no two of the VMs share a host
    VM_HOST_AFFINITY = "vm_host_affinity"  # the VMs run on one of the hosts
    VM_HOST_ANTI_AFFINITY = "vm_host_anti_affinity"  # the VMs run on none of the hosts


class RuleStrength(StrEnum):
    MUST = "must"  # never broken by DRS, placement or maintenance
    SHOULD = "should"  # broken only when nothing else fits, with a warning


class MoveReason(StrEnum):
    MUST_RULE = "must_rule"  # mends a broken must rule (made at every threshold)
    SHOULD_RULE = "should_rule"  # mends a broken should rule
    BALANCE = "balance"  # evens out host load
    EVACUATE = "evacuate"  # the host goes into maintenance


class RecommendationState(StrEnum):
    """What became of a stored DRS recommendation (server/drs/store.py)."""

    PENDING = "pending"  # listed, waiting for ``drs apply`` or ``drs dismiss``
    APPLIED = "applied"  # a migration task was started for it
    DISMISSED = "dismissed"  # a user said no
    EXPIRED = "expired"  # a later pass no longer recommends it, or its VM or hosts changed
