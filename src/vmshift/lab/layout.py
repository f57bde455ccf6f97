"""Names, addresses and the state record of a lab (pure except for reading/writing `lab.json`).

A lab with index i uses 10.213.{4i}.0/24 (management), 10.213.{4i+1}.0/24 (migration),
10.213.{4i+2}.0/24 (VM network) and, with ``--iscsi``, 10.213.{4i+3}.0/24 (storage); see
docs/lab.md. Everything here is derived from (name, index, hosts, iscsi) so that teardown can
find every object again even after a partial `up`.
"""

from __future__ import annotations

import json
import os
import re
import ssl
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vmshift.errors import InvalidInputError, LabError
from vmshift.tls.contexts import client_context
from vmshift.tls.files import ServerTlsFiles

LABS_ROOT = Path(os.environ.get("VMSHIFT_LABS_DIR", "/var/lib/vmshift/labs"))
MAX_LABS = 64
MAX_HOSTS = 9
AGENT_PORT = 8101
NS_PREFIX = "vms-"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")

# Interface names inside namespaces (their own name space, so fixed names are fine).
SWITCH_VM_BRIDGE = "brvm"
SWITCH_MGMT_BRIDGE = "brmgmt"
SWITCH_MIG_BRIDGE = "brmig"
HOST_VM_BRIDGE = "br0"
HOST_UPLINK = "uplink0"
HOST_MGMT = "mgmt0"
HOST_MIG = "mig0"
CLIENT_IF = "eth0"
SWITCH_ROOT_PORT = "root-mgmt"
SWITCH_CLIENT_PORT = "client"
SWITCH_STORAGE_BRIDGE = "brsto"
SWITCH_STORAGE_PORT = "storage"
HOST_STORAGE = "sto0"
STORAGE_IF = "eth0"
ISCSI_DATASTORE = "iscsi-1"
#: tgtd's control port (``tgtd -C N``: its socket in /var/run/tgtd/) is this plus the lab index.
TGT_CONTROL_BASE = 2100


def validate_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise InvalidInputError(
            f"Lab name {name!r} is not valid.",
            hint="Use 1-24 characters: lowercase letters, digits and '-', starting with a letter or digit.",
        )
    return name


def free_index(used: Iterable[int]) -> int:
    """The lowest lab index in 0..63 that no other lab uses."""
    taken = set(used)
    for i in range(MAX_LABS):
        if i not in taken:
            return i
    raise LabError(
        f"All {MAX_LABS} lab slots are in use.", hint="Remove a lab with 'vmshift lab down --name NAME'."
    )


@dataclass(frozen=True)
class LabLayout:
    """Every name and address of one lab."""

    name: str
    index: int
    hosts: int
    iscsi: bool = False

    def __post_init__(self) -> None:
        validate_name(self.name)
        if not 0 <= self.index < MAX_LABS:
            raise InvalidInputError(f"Lab index {self.index} is outside 0..{MAX_LABS - 1}.")
        if not 1 <= self.hosts <= MAX_HOSTS:
            raise InvalidInputError(
                f"A lab has 1 to {MAX_HOSTS} hosts, not {self.hosts}.", hint="Pass --hosts 2 (the default)."
            )

    # -- namespaces
    @property
    def switch_ns(self) -> str:
        return f"{NS_PREFIX}{self.name}-switch"

    def host_ns(self, k: int) -> str:
        return f"{NS_PREFIX}{self.name}-host-{k}"

    @property
    def client_ns(self) -> str:
        return f"{NS_PREFIX}{self.name}-client"

    @property
    def host_numbers(self) -> range:
        return range(1, self.hosts + 1)

    @property
    def storage_ns(self) -> str:
        """The storage box of a lab with ``--iscsi``: tgtd and the storage role run in it."""
        return f"{NS_PREFIX}{self.name}-storage"

    @property
    def namespaces(self) -> list[str]:
        storage = [self.storage_ns] if self.iscsi else []
        return [self.switch_ns, *(self.host_ns(k) for k in self.host_numbers), self.client_ns, *storage]

    # -- interfaces
    @property
    def root_veth(self) -> str:
        """The root namespace's leg into the management bridge (unique per lab: holds the index)."""
        return f"vmslab{self.index}-mgmt"

    def switch_port(self, k: int, role: str) -> str:
        """Switch-side port of host k for role 'vm', 'mgmt' or 'mig'."""
        return f"h{k}-{role}"

    # -- addresses
    @property
    def mgmt_net(self) -> str:
        return f"10.213.{4 * self.index}"

    @property
    def mig_net(self) -> str:
        return f"10.213.{4 * self.index + 1}"

    @property
    def vm_net(self) -> str:
        return f"10.213.{4 * self.index + 2}"

    @property
    def storage_net(self) -> str:
        return f"10.213.{4 * self.index + 3}"

    @property
    def storage_address(self) -> str:
        return f"{self.storage_net}.2"

    def host_storage_address(self, k: int) -> str:
        return f"{self.storage_net}.{10 + k}"

    @property
    def iscsi_portal(self) -> str:
        return f"{self.storage_address}:3260"

    @property
    def tgt_control_port(self) -> int:
        return TGT_CONTROL_BASE + self.index

    @property
    def root_mgmt_address(self) -> str:
        return f"{self.mgmt_net}.1"

    def host_mgmt_address(self, k: int) -> str:
        return f"{self.mgmt_net}.{10 + k}"

    def host_mig_address(self, k: int) -> str:
        return f"{self.mig_net}.{10 + k}"

    def agent_address(self, k: int) -> str:
        return f"{self.host_mgmt_address(k)}:{AGENT_PORT}"

    @property
    def client_address(self) -> str:
        return f"{self.vm_net}.2"

    @property
    def vm_cidr(self) -> str:
        return f"{self.vm_net}.0/24"

    @property
    def pool_first(self) -> str:
        return f"{self.vm_net}.100"

    @property
    def pool_last(self) -> str:
        return f"{self.vm_net}.199"

    # -- files
    @property
    def lab_dir(self) -> Path:
        return lab_dir(self.name)

    @property
    def server_dir(self) -> Path:
        return self.lab_dir / "server"

    @property
    def datastores_dir(self) -> Path:
        return self.lab_dir / "datastores"

    @property
    def shared_datastore(self) -> Path:
        return self.datastores_dir / "shared-1"

    def local_datastore(self, k: int) -> Path:
        return self.datastores_dir / f"local-host-{k}"

    def iscsi_datastore(self, k: int) -> Path:
        """Host k's folder of datastore iscsi-1 (VM folders; the disks are LUNs on the target)."""
        return self.datastores_dir / f"{ISCSI_DATASTORE}-host-{k}"

    @property
    def storage_dir(self) -> Path:
        """The storage box's disk: the storage role's record and the LUNs' backing files."""
        return self.lab_dir / "storage"

    def agent_state_dir(self, k: int) -> Path:
        return Path("/run/vmshift") / f"{self.name}-host-{k}"

    def agent_config(self, k: int) -> Path:
        return self.lab_dir / f"agent-host-{k}.json"

    def log_file(self, proc: str) -> Path:
        return self.lab_dir / "logs" / f"{proc}.log"


def lab_dir(name: str) -> Path:
    return LABS_ROOT / name


@dataclass
class LabRecord:
    """The content of `lab.json`: what `down`, `env` and the probes need to find the lab again."""

    name: str
    index: int
    hosts: int
    state: str = "building"
    server_url: str | None = None
    token: str | None = None
    migration_link_rate: str | None = None
    iscsi: bool = False
    pids: dict[str, int] = field(default_factory=dict)
    host_names: dict[str, str] = field(default_factory=dict)

    @property
    def layout(self) -> LabLayout:
        return LabLayout(self.name, self.index, self.hosts, self.iscsi)

    @property
    def ca_file(self) -> Path:
        """The cluster CA the lab's server made on its first start: clients verify the server with it."""
        return ServerTlsFiles.of(self.layout.server_dir).ca_cert

    def server_tls(self) -> ssl.SSLContext:
        """An SSL context that verifies the lab's server (for httpx's ``verify=``)."""
        return client_context(self.ca_file)

    def save(self) -> None:
        path = lab_dir(self.name) / "lab.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f, indent=2)
            f.write("\n")
        tmp.replace(path)


def load_record(name: str) -> LabRecord | None:
    path = lab_dir(name) / "lab.json"
    try:
        data = json.loads(path.read_text())
        return LabRecord(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        raise LabError(
            f"The lab record {path} is unreadable: {e}.",
            hint=f"Remove the lab with 'vmshift lab down --name {name}'.",
        ) from e


def list_records() -> list[LabRecord]:
    records = []
    if LABS_ROOT.is_dir():
        for d in sorted(LABS_ROOT.iterdir()):
            try:
                rec = load_record(d.name)
            except LabError:
                continue
            if rec is not None:
                records.append(rec)
    return records
