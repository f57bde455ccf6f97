"""iSCSI datastores registered at run time (`vmshift datastore add NAME --iscsi PORTAL --target IQN`).

Each is a folder of the agent's own, ``DIR/NAME/`` (the config's ``registered_datastores_dir``),
holding the iSCSI marker (the UUID the server chose, the same on every host) and, beside it,
``NAME.token`` with the storage role's token (0600). ``registered.json`` lists them, so they come
back when the agent restarts. The LUNs themselves stay on the target, made and removed by its
storage role as for the lab's iscsi-1.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import httpx

from vmshift.agent.datastores import MARKER_FILE
from vmshift.errors import ConflictError, InvalidInputError, NotFoundError
from vmshift.model.enums import DatastoreKind
from vmshift.model.iscsi import AgentIscsiDatastore, TargetInfo

PROBE_TIMEOUT_S = 3.0
RECORD_FILE = "registered.json"


class IscsiRegistry:
    def __init__(self, folder: Path) -> None:
        self.dir = folder

    def names(self) -> list[str]:
        try:
            return [str(n) for n in json.loads((self.dir / RECORD_FILE).read_text())]
        except (OSError, ValueError, TypeError):
            return []

    def folder(self, name: str) -> Path:
        return self.dir / name

    def token_file(self, name: str) -> Path:
        return self.dir / f"{name}.token"

    def paths(self) -> list[Path]:
        return [self.folder(n) for n in self.names()]

    def token_files(self) -> dict[str, Path]:
        return {n: self.token_file(n) for n in self.names()}

    def _save(self, names: list[str]) -> None:
        tmp = self.dir / f".{RECORD_FILE}.tmp"
        tmp.write_text(json.dumps(sorted(set(names))))
        os.replace(tmp, self.dir / RECORD_FILE)

    def add(self, req: AgentIscsiDatastore) -> Path:
        """The folder with its marker and token, recorded (nothing is left when a step fails)."""
        folder = self.folder(req.name)
        if folder.exists():
            raise ConflictError(f"{folder} already exists on this host.",
                                hint="Remove it, or register the datastore under another name.")
        self.dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        try:
            folder.mkdir(mode=0o755)
            marker = {"uuid": req.uuid, "name": req.name, "type": DatastoreKind.ISCSI.value,
                      "portal": req.portal, "target": req.target, "storage_role": req.storage_role}
            (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
            token = self.token_file(req.name)
            token.touch(mode=0o600)
            token.write_text(req.token + "\n")
            self._save([*self.names(), req.name])
        except OSError:
            self._forget(req.name)
            raise
        return folder

    def remove(self, name: str) -> None:
        """Unregister ``name`` (only a datastore this registry made, and only with no VM in it)."""
        if name not in self.names():
            raise NotFoundError(f"Datastore {name!r} was not registered on this host by 'datastore add'.",
                                hint="Datastores from the agent's config are removed there.")
        folder = self.folder(name)
        vms = sorted(p.parent.name for p in folder.glob("*/vm.json"))
        if vms:
            raise ConflictError(f"Datastore {name!r} still holds VM {', '.join(vms)} on this host.",
                                hint="Delete or move those VMs first.")
        self._forget(name)

    def _forget(self, name: str) -> None:
        shutil.rmtree(self.folder(name), ignore_errors=True)
        self.token_file(name).unlink(missing_ok=True)
        if name in self.names():
            self._save([n for n in self.names() if n != name])


async def check_target(host: str, req: AgentIscsiDatastore) -> None:
    """The portal answers from this host and the storage role serves the named target with this
    token; a clear 400 otherwise (nothing is registered)."""
    address, _, port = req.portal.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, int(port)), PROBE_TIMEOUT_S)
        writer.close()
        await writer.wait_closed()
    except (OSError, TimeoutError, ValueError) as exc:
        why = f"no answer in {PROBE_TIMEOUT_S:.0f} s" if isinstance(exc, TimeoutError) else str(exc)
        raise InvalidInputError(f"The iSCSI portal {req.portal} does not answer from host {host} ({why}).",
                                hint="Check the address and port, and that the target's tgtd listens there."
                                ) from exc
    try:
        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S + 2, trust_env=False) as http:
            r = await http.get(f"{req.storage_role}/api/v1/target",
                               headers={"Authorization": f"Bearer {req.token}"})
    except httpx.HTTPError as exc:
        raise InvalidInputError(f"The storage role at {req.storage_role} does not answer from host {host} "
                                f"({exc or type(exc).__name__}).",
                                hint="Check its URL, and that it runs beside tgtd (docs/datastores.md)."
                                ) from exc
    if r.status_code == 401:
        raise InvalidInputError(f"The storage role at {req.storage_role} refused the token.",
                                hint="Give the token in the storage role's token_file.")
    if r.status_code != 200:
        raise InvalidInputError(f"The storage role at {req.storage_role} answered {r.status_code}.",
                                hint="Check its URL and its log.")
    served = TargetInfo.model_validate(r.json())
    if served.target != req.target:
        raise InvalidInputError(f"The storage role at {req.storage_role} manages target {served.target}, "
                                f"not {req.target}.", hint="Give the IQN it manages, or its own URL.")
