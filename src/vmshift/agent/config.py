"""The agent's configuration file (JSON, see docs/agent.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmshift.errors import InvalidInputError

ACCELERATOR_CHOICES = ("auto", "kvm", "tcg")
DEFAULT_QEMU_USER = "vmshift-qemu"
DEFAULT_SERIAL_LOG_CAP_BYTES = 4 << 20
MIN_SERIAL_LOG_CAP_BYTES = 64 << 10
DEFAULT_STATS_INTERVAL_S = 10.0  # the host stream's stats report period (agent/host_stream.py)


@dataclass(frozen=True)
class AgentConfig:
    name: str
    listen: str
    state_dir: Path
    ca_file: Path  # the cluster CA: only clients with a certificate it issued may call this agent
    datastores: list[Path] = field(default_factory=list)
    networks: dict[str, str] = field(default_factory=dict)
    management_address: str = ""
    migration_address: str = ""
    accelerator: str = "auto"
    qemu_binary: str = "qemu-system-x86_64"
    qemu_img: str = "qemu-img"
    record_retention_days: int = 30  # finished migration and move records in state_dir; 0 keeps them
    #: the unprivileged user QEMU runs as; "" (or a user this host lacks): root (docs/confinement.md)
    qemu_user: str = DEFAULT_QEMU_USER
    #: the most the two files of a VM's serial log (serial.log, serial.log.1) hold together
    serial_log_cap_bytes: int = DEFAULT_SERIAL_LOG_CAP_BYTES
    #: how often the host stream reports per-VM CPU and memory and the host's free space (seconds)
    stats_interval_s: float = DEFAULT_STATS_INTERVAL_S
    #: iSCSI datastore name -> the file holding its storage role's token (docs/datastores.md)
    storage_role_tokens: dict[str, Path] = field(default_factory=dict)
    #: where `vmshift datastore add --iscsi` makes its datastores' folders (None: state_dir/datastores;
    #: QEMU's user must be able to pass through it, which the private state_dir does not allow)
    registered_datastores_dir: Path | None = None

    @property
    def registered_dir(self) -> Path:
        return self.registered_datastores_dir or self.state_dir / "datastores"

    @property
    def listen_host(self) -> str:
        return self.listen.rsplit(":", 1)[0]

    @property
    def listen_port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


def _bad(path: Path, what: str) -> InvalidInputError:
    return InvalidInputError(f"The agent config {path} is not valid: {what}.",
                             hint="See docs/agent.md for the config file format.")


def config_from_dict(data: dict[str, Any], source: Path = Path("<dict>")) -> AgentConfig:
    if "token_file" in data:
        raise _bad(source, "'token_file' is gone: agents accept only clients with a certificate of the "
                   "cluster CA now; remove it and set 'ca_file' to the server's CA (vmshift-server ca show)")
    for key in ("name", "listen", "state_dir", "ca_file"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise _bad(source, f"'{key}' must be a non-empty string")
    listen = data["listen"]
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise _bad(source, f"'listen' must be ADDRESS:PORT, not {listen!r}")
    datastores = data.get("datastores", [])
    if not isinstance(datastores, list) or not all(isinstance(d, str) for d in datastores):
        raise _bad(source, "'datastores' must be a list of directory paths")
    networks = data.get("networks", {})
    if not isinstance(networks, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in networks.items()
    ):
        raise _bad(source, "'networks' must map network labels to bridge names")
    accel = data.get("accelerator", "auto")
    if accel not in ACCELERATOR_CHOICES:
        raise _bad(source, f"'accelerator' must be one of {', '.join(ACCELERATOR_CHOICES)}")
    retention = data.get("record_retention_days", AgentConfig.record_retention_days)
    if isinstance(retention, bool) or not isinstance(retention, int) or retention < 0:
        raise _bad(source, "'record_retention_days' must be a whole number of days (0 keeps records forever)")
    qemu_user = data.get("qemu_user", DEFAULT_QEMU_USER)
    if not isinstance(qemu_user, str):
        raise _bad(source, "'qemu_user' must be a user name (\"\" runs QEMU as root)")
    cap = data.get("serial_log_cap_bytes", DEFAULT_SERIAL_LOG_CAP_BYTES)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < MIN_SERIAL_LOG_CAP_BYTES:
        raise _bad(source, "'serial_log_cap_bytes' must be a whole number of at least "
                           f"{MIN_SERIAL_LOG_CAP_BYTES}")
    stats = data.get("stats_interval_s", DEFAULT_STATS_INTERVAL_S)
    if isinstance(stats, bool) or not isinstance(stats, int | float) or not 1 <= stats <= 3600:
        raise _bad(source, "'stats_interval_s' must be a number of seconds from 1 to 3600")
    tokens = data.get("storage_role_tokens", {})
    if not isinstance(tokens, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in tokens.items()
    ):
        raise _bad(source, "'storage_role_tokens' must map iSCSI datastore names to token file paths")
    registered = data.get("registered_datastores_dir")
    if registered is not None and (not isinstance(registered, str) or not registered):
        raise _bad(source, "'registered_datastores_dir' must be a directory path")
    known = {"name", "listen", "state_dir", "ca_file", "datastores", "networks", "management_address",
             "migration_address", "accelerator", "qemu_binary", "qemu_img", "record_retention_days",
             "qemu_user", "serial_log_cap_bytes", "stats_interval_s", "storage_role_tokens",
             "registered_datastores_dir"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise _bad(source, f"unknown key(s) {', '.join(unknown)}")
    return AgentConfig(
        name=data["name"], listen=listen,
        state_dir=Path(data["state_dir"]), ca_file=Path(data["ca_file"]),
        datastores=[Path(d) for d in datastores],
        networks=dict(networks), management_address=str(data.get("management_address", "")),
        migration_address=str(data.get("migration_address", "")), accelerator=accel,
        qemu_binary=str(data.get("qemu_binary", "qemu-system-x86_64")),
        qemu_img=str(data.get("qemu_img", "qemu-img")), record_retention_days=retention,
        qemu_user=qemu_user, serial_log_cap_bytes=cap, stats_interval_s=float(stats),
        storage_role_tokens={k: Path(v) for k, v in tokens.items()},
        registered_datastores_dir=Path(registered) if registered else None,
    )


def load_config(path: Path) -> AgentConfig:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InvalidInputError(f"The agent config {path} cannot be read ({exc.strerror}).",
                                hint="Pass an existing file with --config.") from exc
    except json.JSONDecodeError as exc:
        raise _bad(path, f"not JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, dict):
        raise _bad(path, "the top level must be a JSON object")
    return config_from_dict(data, path)
