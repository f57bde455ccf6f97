"""What an agent reports about suspending a VM (``POST/GET /api/v1/vms/{name}/suspend``)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field

from vmshift.model.vm import VmRuntime

#: A save or load that writes (reads) slower than this, plus the slack, counts as stuck.
MIN_STATE_RATE_BPS = 16 << 20
STATE_SLACK_S = 60.0


def state_timeout_s(memory_bytes: int) -> float:
    """How long saving or loading the state of a VM with this much RAM may take."""
    return memory_bytes / MIN_STATE_RATE_BPS + STATE_SLACK_S


class SuspendPhase(StrEnum):
    STOPPING = "stopping"  # vCPUs halted, capabilities set
    SAVING = "saving"  # QEMU writes RAM and device state to the file
    SYNCING = "syncing"  # fsync and rename of the finished file
    QUITTING = "quitting"  # the state is on disk; QEMU exits
    DONE = "done"
    FAILED = "failed"  # the VM runs again as before; no state file is left


class SuspendProgress(BaseModel):
    vm: str
    phase: SuspendPhase
    percent: int = Field(ge=0, le=100)
    ram_bytes: int = Field(description="the guest's RAM blocks, zero pages included")
    written_bytes: int = Field(description="pages written so far; zero pages are skipped")
    elapsed_s: float
    rate_bps: float = Field(description="written_bytes per second of saving")
    error: str | None = None


class SuspendResult(BaseModel):
    """A finished suspend: the VM (suspended) and what its state file cost."""

    runtime: VmRuntime
    state_file: str
    file_bytes: int = Field(description="apparent size of the state file")
    allocated_bytes: int = Field(description="disk space the state file occupies (it is sparse)")
    memory_bytes: int = Field(description="the VM's configured RAM")
    written_bytes: int
    save_s: float = Field(description="from the save command to QEMU's 'completed'")
    write_bps: float = Field(description="written_bytes / save_s")
    total_s: float = Field(description="from the request to QEMU's exit")
    direct_io: bool
