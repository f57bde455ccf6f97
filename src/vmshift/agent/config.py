"""The agent's configuration file (JSON, see docs/agent.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmshift.errors import InvalidInputError

ACCELERATOR_CHOICES = ("auto", "kvm", "tcg")


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
    known = {"name", "listen", "state_dir", "ca_file", "datastores", "networks", "management_address",
             "migration_address", "accelerator", "qemu_binary", "qemu_img"}
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
        qemu_img=str(data.get("qemu_img", "qemu-img")),
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
