"""What an agent reports about its host (the "host facts")."""

from __future__ import annotations

from pydantic import BaseModel, Field

from vmshift.model.enums import Accelerator, DatastoreKind


class CpuModelInfo(BaseModel):
    """A QEMU CPU model and the features this host lacks to run it (empty = runnable)."""

    name: str
    unavailable_features: list[str] = Field(default_factory=list)

    @property
    def runnable(self) -> bool:
        return not self.unavailable_features


class DatastoreProof(BaseModel):
    """A directory datastore's sharing proof as one host sees it (agent/share_proof.py)."""

    token: str = Field(description="the token of this host's file in the datastore")
    previous: str = Field(default="", description="the token before the last rotation")
    peers: dict[str, str] = Field(default_factory=dict,
                                  description="the other hosts' tokens read in the datastore, by host name")


class DatastoreInfo(BaseModel):
    """A datastore as one host sees it: identity comes from the UUID marker file in its root."""

    uuid: str
    name: str
    path: str
    capacity_mib: int = 0
    free_mib: int = 0
    images: list[str] = Field(default_factory=list)
    disk_images: dict[str, int] = Field(
        default_factory=dict, description="the images a VM can boot from by disk: name -> virtual size, MiB")
    kind: DatastoreKind = DatastoreKind.DIRECTORY
    portal: str = Field(default="", description="iSCSI: the target's portal, ADDRESS:PORT")
    target: str = Field(default="", description="iSCSI: the target's IQN")
    proof: DatastoreProof | None = Field(
        default=None, description="directory datastores: the proof that it is shared; None: not proven "
                                  "by this host (an older agent, an iSCSI datastore), trusted by UUID")


class HostFacts(BaseModel):
    name: str
    cpu_vendor: str
    cpu_model: str
    cpu_flags: list[str] = Field(default_factory=list)
    cpus: int
    qemu_version: str
    machine_types: list[str] = Field(default_factory=list)
    default_machine_type: str = ""
    cpu_models: list[CpuModelInfo] = Field(default_factory=list)
    accelerator: Accelerator
    memory_total_mib: int
    memory_free_mib: int
    datastores: list[DatastoreInfo] = Field(default_factory=list)
    unproven_datastores: list[DatastoreInfo] = Field(
        default_factory=list, description="set by the server: datastores this host reports with the UUID "
        "of another host's, but whose sharing it could not prove; they are ignored (docs/datastores.md)")
    networks: dict[str, str] = Field(default_factory=dict, description="network label -> bridge")
    management_address: str = ""
    migration_address: str = ""
    agent_version: str = ""
    migration_tls: bool = Field(
        default=False, description="the host holds its cluster certificate, so it can encrypt a migration")
    qemu_user: str = Field(default="", description="the unprivileged user this host's QEMUs run as; "
                                                   "empty: root (older agents say nothing, hence empty)")
    qemu_confined_why_not: str = Field(default="", description="why QEMU runs as root here, if it does")
