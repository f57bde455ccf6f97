"""iSCSI datastores: names, the storage role's API bodies and its attach rule (pure, no I/O).

One LUN per VM disk on one target per datastore, managed by the storage role that runs beside
tgtd (agent/storage_role.py). Hypervisor hosts open a LUN with QEMU's user-space initiator under
their own initiator name, which is what the target's ACL admits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel, Field

from vmshift.errors import ConflictError
from vmshift.model.base import RequestModel
from vmshift.model.enums import DiskFormat
from vmshift.model.inputs import DatastoreName, HostName

#: The naming authority of the IQNs vmshift makes (RFC 3720: iqn.YYYY-MM.reversed-domain[:unique]).
IQN_PREFIX = "iqn.2026-12.io.vmshift"
ISCSI_PORT = 3260
#: The storage role's HTTP port on the storage network.
STORAGE_ROLE_PORT = 8102
#: Seconds QEMU's initiator waits on a target before it fails the request (BlockdevOptionsIscsi
#: ``timeout``; 0 would wait forever). A VM whose disks are on iSCSI stops on an I/O error
#: (werror/rerror=stop) instead of handing it to the guest, so the timeout pauses the VM.
ISCSI_TIMEOUT_S = 10
_IQN_RE = re.compile(r"^iqn\.\d{4}-\d{2}\.[a-z0-9][a-z0-9.-]*(:[A-Za-z0-9.:_-]+)?$")
_LUN_KEY_RE = re.compile(r"^[0-9a-f-]{36}/[A-Za-z0-9._-]{1,64}$")
#: tgt reserves LUN 0 of every target for its controller.
FIRST_LUN = 1


def initiator_name(host: str) -> str:
    """The initiator name a host's QEMU presents (what the target's ACL admits)."""
    return f"{IQN_PREFIX}:host.{host}"


def datastore_target(datastore: str, qualifier: str = "") -> str:
    """The IQN of a datastore's target (``qualifier`` keeps several labs' targets apart)."""
    suffix = f"{qualifier}.{datastore}" if qualifier else datastore
    return f"{IQN_PREFIX}:ds.{suffix}"


def valid_iqn(iqn: str) -> bool:
    return bool(_IQN_RE.match(iqn))


def lun_key(vm_uuid: str, disk_file: str) -> str:
    """The storage role's name of a VM disk's LUN: the same from every host, so a migration target
    finds the LUN its source made instead of making another."""
    return f"{vm_uuid}/{disk_file}"


@dataclass(frozen=True)
class IscsiLun:
    """Where a host's QEMU finds a disk: ``iscsi://portal/target/lun`` as ``initiator``."""

    portal: str
    target: str
    lun: int
    initiator: str

    def blockdev(self, node_name: str) -> dict[str, object]:
        """QEMU's ``BlockdevOptionsIscsi`` (protocol node; the format node on top is raw)."""
        return {"driver": "iscsi", "node-name": node_name, "transport": "tcp", "portal": self.portal,
                "target": self.target, "lun": self.lun, "initiator-name": self.initiator,
                "timeout": ISCSI_TIMEOUT_S, "cache": {"direct": True}}


# ---------------------------------------------------------------- the storage role's API


class LunCreate(RequestModel):
    key: str = Field(pattern=_LUN_KEY_RE.pattern, description="VM_UUID/DISK_FILE (lun_key)")
    size_mib: int = Field(gt=0, le=16 << 20)
    format: DiskFormat = Field(default=DiskFormat.RAW, description="raw, or qcow2 with its metadata "
                               "preallocated (the LUN's size is fixed when it is made)")


class AttachRequest(RequestModel):
    host: str = Field(min_length=1, max_length=64)
    initiator: str = Field(min_length=8, max_length=223)
    migration_id: int | None = Field(default=None, description="set while a live migration hands the "
                                     "VM over: the one time two hosts may hold the LUN read-write")


class DetachRequest(RequestModel):
    host: str = Field(min_length=1, max_length=64)


class Attachment(BaseModel):
    host: str
    initiator: str
    migration_id: int | None = None


class LunInfo(BaseModel):
    key: str
    lun: int
    size_mib: int
    format: DiskFormat = DiskFormat.RAW
    attachments: list[Attachment] = Field(default_factory=list)


class TargetInfo(BaseModel):
    target: str
    portal: str
    capacity_mib: int
    free_mib: int
    luns: list[LunInfo] = Field(default_factory=list)


def next_lun(used: set[int]) -> int:
    lun = FIRST_LUN
    while lun in used:
        lun += 1
    return lun


def attach(lun: LunInfo, req: AttachRequest) -> list[Attachment]:
    """The LUN's attachments once ``req`` holds it read-write, or a ConflictError.

    A LUN is held by one host; a second host may join only during a live migration's handover
    (``migration_id`` set), and only as one more holder beside the source, never a third."""
    others = [a for a in lun.attachments if a.host != req.host]
    mine = Attachment(host=req.host, initiator=req.initiator, migration_id=req.migration_id)
    if not others:
        return [mine]
    if req.migration_id is None:
        raise ConflictError(
            f"LUN {lun.lun} ({lun.key}) is attached read-write on {', '.join(a.host for a in others)}: "
            f"{req.host} may not attach it too outside a migration.",
            hint="Stop the VM there first, or live-migrate it (the only time two hosts hold a LUN).")
    if len(others) > 1:
        raise ConflictError(
            f"LUN {lun.lun} ({lun.key}) is already held by {len(others)} hosts during a handover.",
            hint="Wait until the migration in flight ends.")
    return [*others, mine]


def detach(lun: LunInfo, host: str) -> list[Attachment]:
    """The LUN's attachments without ``host`` (the survivor of a handover is no longer in one)."""
    return [Attachment(host=a.host, initiator=a.initiator) for a in lun.attachments if a.host != host]


# ---------------------------------------------------------------- registering an existing target

PORTAL_PATTERN = r"^[A-Za-z0-9.-]{1,253}:[0-9]{1,5}$"
IQN_PATTERN = _IQN_RE.pattern
ROLE_URL_PATTERN = r"^https?://[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?$"
TOKEN_PATTERN = r"^[A-Za-z0-9._~+/=-]{1,256}$"


class IscsiDatastoreAdd(RequestModel):
    """An existing iSCSI target, with the storage role that makes its LUNs, registered as a datastore
    on hosts (`vmshift datastore add NAME --iscsi PORTAL --target IQN`)."""

    name: DatastoreName
    portal: str = Field(pattern=PORTAL_PATTERN, max_length=259,
                        description="ADDRESS:PORT, e.g. 10.0.3.2:3260")
    target: str = Field(pattern=IQN_PATTERN, max_length=223, description="the target's IQN")
    storage_role: str = Field(pattern=ROLE_URL_PATTERN, max_length=270,
                              description="the storage role's URL, e.g. http://10.0.3.2:8102")
    token: str = Field(pattern=TOKEN_PATTERN, max_length=256,
                       description="the storage role's token (its token_file)")
    hosts: list[HostName] = Field(default_factory=list, max_length=256,
                                  description="the hosts that get it; empty: every host in the inventory")


class AgentIscsiDatastore(RequestModel):
    """What the server asks each host's agent to register (the UUID is the same on every host)."""

    name: DatastoreName
    uuid: str = Field(pattern=r"^[0-9a-f-]{36}$")
    portal: str = Field(pattern=PORTAL_PATTERN, max_length=259)
    target: str = Field(pattern=IQN_PATTERN, max_length=223)
    storage_role: str = Field(pattern=ROLE_URL_PATTERN, max_length=270)
    token: str = Field(pattern=TOKEN_PATTERN, max_length=256)
