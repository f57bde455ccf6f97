"""The VM spec (desired configuration) and the runtime view an agent reports."""

from __future__ import annotations

import re

from pydantic import BaseModel, Field, field_validator

from vmshift.model.enums import BootKind, DiskFormat, PowerState
from vmshift.model.inputs import VmName
from vmshift.model.inputs import check_name as check_name  # re-exported: it lived here before

MAC_RE = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")


class DiskSpec(BaseModel):
    """A disk in the VM's folder on a datastore (qcow2 or raw); empty of a size, or backed by an image."""

    datastore: str = Field(description="datastore name")
    file: str = Field(description="file name inside DATASTORE/VMNAME/")
    size_mib: int = Field(gt=0)
    format: DiskFormat = Field(default=DiskFormat.QCOW2, description="image format of the file")
    backing_image: str | None = Field(default=None, description="image name whose disk backs this one "
                                      "(a linked clone: a qcow2 overlay, the image on the same datastore)")
    clone_of: str | None = Field(default=None, description="image name whose disk was copied whole into "
                                 "this one when it was created (a full clone)")


class NicSpec(BaseModel):
    network: str
    mac: str

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        v = v.lower()
        if not MAC_RE.fullmatch(v):
            raise ValueError(f"MAC address {v!r} is not valid: use six hex pairs like 52:54:00:12:34:56")
        return v


class SeedSpec(BaseModel):
    """What a cloud-init NoCloud seed tells the guest (model/cloud_init.py turns it into files).

    Part of the spec, so every host that defines or starts the VM writes the same seed: the seed
    ISO moves with the VM by being made again from this wherever it is missing."""

    instance_id: str = Field(description="cloud-init runs its first-boot steps once per instance id")
    hostname: str
    mac: str | None = Field(default=None, description="MAC of the NIC the address belongs to")
    address: str | None = Field(default=None, description="ADDR/PREFIX the server allocated, static")
    ssh_keys: list[str] = Field(default_factory=list, description="public keys for the default user")


class BootSpec(BaseModel):
    kind: BootKind
    image: str | None = Field(default=None, description="image name on the VM's datastore")
    cmdline: str = ""


class VmSpec(BaseModel):
    """Everything an agent needs to define and run a VM. Paths are datastore-relative."""

    name: VmName
    uuid: str
    cpus: int = Field(ge=1, le=64)
    memory_mib: int = Field(ge=16)
    cpu_model: str
    machine_type: str
    datastore: str = Field(description="home datastore: the VM's files live in DATASTORE/NAME/")
    disks: list[DiskSpec] = Field(default_factory=list)
    nics: list[NicSpec] = Field(default_factory=list)
    boot: BootSpec
    seed: SeedSpec | None = Field(default=None, description="a cloud-init seed attached as a CD-ROM")


class VmRuntime(BaseModel):
    """Runtime truth about one VM on one host, as its agent sees it."""

    name: str
    uuid: str
    power_state: PowerState
    pid: int | None = None
    cpu_seconds: float = 0.0
    rss_mib: float = 0.0
    qemu_status: str | None = Field(default=None, description="QMP query-status 'status'")
    died: bool = Field(default=False, description="the QEMU process vanished without being stopped")
    exit_reason: str | None = None
    suspend_state_bytes: int | None = Field(
        default=None, description="a suspended VM: the size of its saved state file (a move copies it)"
    )
    incoming_migration: int | None = Field(
        default=None,
        description="id of the live migration this QEMU receives; such a QEMU is not the VM yet, only "
        "a copy waiting for (or loading) its state",
    )
    io_error: str | None = Field(
        default=None, description="a disk problem: the last BLOCK_IO_ERROR (disk, operation, reason) of a "
        "VM paused in QEMU's run state io-error, or the agent's note that its iSCSI target stopped answering")

    @property
    def has_qemu(self) -> bool:
        """A QEMU process of the VM exists on the host (running, paused or in any other run state)."""
        return self.power_state not in (PowerState.POWERED_OFF, PowerState.SUSPENDED)

    @property
    def is_the_vm(self) -> bool:
        """This QEMU is a normal VM of its host, not the receiving end of a live migration."""
        return self.incoming_migration is None
