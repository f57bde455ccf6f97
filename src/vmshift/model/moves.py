"""Moves other than a plain live migration: their kinds and the agent's disk-move contract.

Every move is one migration record with a kind (ARCHITECTURE.md, "Who owns what"). The live kind
runs the existing source loop; the disk kinds run as a *disk move* on an agent: a job that copies
a VM's disks (and, for a suspended VM, its saved state) to a target datastore, here or on another
host, with one progress shape and one cancel. Pure pydantic types, no I/O.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field

from vmshift.model.api import ErrorInfo
from vmshift.model.base import RequestModel
from vmshift.model.enums import DiskFormat, MigrationKind
from vmshift.model.migration import MigrationPhase
from vmshift.model.vm import VmSpec

__all__ = [
    "DiskExportRequest", "DiskExports", "DiskFormat", "DiskMoveRequest", "DiskProgress", "MigrationKind",
    "MoveProgress", "MoveState", "NbdTarget",
]


class MoveState(StrEnum):
    """Where an agent's disk move stands."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"  # rolled back: the VM runs (or stays) on its original files
    CANCELLED = "cancelled"  # rolled back on request

    @property
    def finished(self) -> bool:
        return self is not MoveState.RUNNING


class NbdTarget(BaseModel):
    """One writable NBD export of a target disk (made by the target agent's ``POST /disk-exports``)."""

    index: int = Field(ge=0, description="index of the disk in the VM's spec")
    uri: str = Field(description="nbd://ADDRESS:PORT/EXPORT on the target's migration address")
    size_bytes: int = Field(ge=0, description="virtual size the export offers")


class DiskExportRequest(RequestModel):
    """Target side: create the VM's disks on its datastore and export them over NBD."""

    move_id: int
    nonce: str
    spec: VmSpec = Field(description="the VM's spec as it will be on the target (target datastores)")
    sizes_bytes: list[int] = Field(description="virtual size of each disk of the spec, in order")
    disk_format: DiskFormat = DiskFormat.QCOW2
    state_size_bytes: int | None = Field(default=None, ge=0,
                                         description="a suspended VM: its state file's size")


class DiskExports(BaseModel):
    move_id: int
    targets: list[NbdTarget]
    state_uri: str | None = Field(
        default=None, description="NBD export of the suspended VM's state file on the target, if any"
    )


class DiskMoveRequest(RequestModel):
    """Source side: start copying the VM's files (``POST /api/v1/moves``)."""

    move_id: int
    nonce: str
    server_id: str | None = None
    vm: str
    kind: MigrationKind
    target_spec: VmSpec = Field(description="the VM's spec after the move (its new datastore, disk names)")
    disk_format: DiskFormat | None = Field(default=None, description="None: keep each disk's format")
    targets: list[NbdTarget] = Field(
        default_factory=list, description="empty: the target files are on this host (Storage vMotion)"
    )
    state_uri: str | None = None
    speed_bps: float | None = Field(
        default=None, gt=0, description="cap on the copy's background rate (bytes/s); None: no cap"
    )
    allow_write_blocking: bool = Field(
        default=True, description="False: mirrors stay in background mode (a benchmark's or test's contrast)"
    )


class DiskProgress(BaseModel):
    index: int
    source: str = Field(description="source file (host path)")
    target: str = Field(description="target file or NBD URI")
    total_bytes: int = 0
    done_bytes: int = 0
    ready: bool = Field(default=False, description="a mirror that holds a full copy and follows writes")
    write_blocking: bool = Field(default=False, description="the mirror copies each guest write at once")
    identical: bool | None = Field(default=None, description="qemu-img compare at the pivot or the end")


class MoveProgress(BaseModel):
    """``GET /api/v1/moves/{id}``: one disk move on its agent."""

    move_id: int
    nonce: str | None = None
    vm: str
    kind: MigrationKind
    state: MoveState
    phase: MigrationPhase
    disks: list[DiskProgress] = Field(default_factory=list)
    total_bytes: int = 0
    done_bytes: int = 0
    rate_bps: float = 0.0
    eta_s: float | None = None
    elapsed_s: float = 0.0
    write_blocking_after_s: float | None = Field(
        default=None, description="seconds into the copy when the mirrors turned write-blocking"
    )
    pivot_ms: float | None = Field(default=None, description="time from job-complete to the new files in use")
    error: ErrorInfo | None = None
    written_spec: VmSpec | None = Field(
        default=None, description="the definition the agent wrote at the VM's home once past the point of no "
        "return: the inventory records it whatever the end (a partial pivot names each disk where it is)",
    )
