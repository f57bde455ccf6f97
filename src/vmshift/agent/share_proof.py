"""Proof that a directory datastore is really shared: a file one host writes, read back by another.

Two hosts reporting the same marker UUID may still see two different directories (a marker copied
by hand, or a whole folder copied with rsync). So each agent keeps a file of its own in each
directory datastore, ``DATASTORE/.vmshift-hosts/HOST.json``, holding a random token, and reports
the tokens of the other hosts' files it reads there. The server counts two hosts as sharing the
datastore only when one of them read the other's current token (server/datastore_sharing.py).

The agent writes its file before it reads the others (every facts scan does both), so of two
hosts the one that wrote later always reads the other's token: a really shared directory is proven
at the first report. The token is rotated every ``ROTATE_S``, so the copy of a folder stops proving
anything once its writer rotated.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path

from vmshift.model.host import DatastoreProof

log = logging.getLogger(__name__)

PROOF_DIR = ".vmshift-hosts"
ROTATE_S = 300.0


class ShareProof:
    """This host's tokens (current and previous) and its file in each directory datastore."""

    def __init__(self, host: str, *, state_file: Path | None = None, rotate_s: float = ROTATE_S) -> None:
        """``state_file`` keeps the tokens across agent restarts: a restarted agent that came back
        with a new token would not be proven by what the other hosts read before (until they report
        again), and a host that happened to rotate meanwhile could leave it unproven."""
        self.host = host
        self.rotate_s = rotate_s
        self.state_file = state_file
        self.token, self.previous, self._rotated = secrets.token_hex(16), "", time.time()
        saved = _load(state_file)
        if saved is not None:
            self.token, self.previous, self._rotated = saved
        else:
            self._save()

    def _save(self) -> None:
        if self.state_file is None:
            return
        try:
            tmp = self.state_file.with_name(f".{self.state_file.name}.tmp")
            tmp.unlink(missing_ok=True)
            tmp.touch(mode=0o600)
            tmp.write_text(json.dumps({"token": self.token, "previous": self.previous,
                                       "rotated_at": self._rotated}))
            os.replace(tmp, self.state_file)
        except OSError as exc:
            log.warning("cannot keep the sharing proof's tokens in %s: %s", self.state_file, exc)

    def _rotate_if_due(self) -> None:
        now = time.time()
        if not 0 <= now - self._rotated < self.rotate_s:  # due, or the clock went back
            self.previous, self.token, self._rotated = self.token, secrets.token_hex(16), now
            self._save()

    def refresh(self, datastore_dir: Path) -> DatastoreProof | None:
        """Write this host's file (when it does not hold the current token), then read the others'.
        None when the directory cannot be written: nothing is proven, and the log says why."""
        self._rotate_if_due()
        folder = datastore_dir / PROOF_DIR
        mine = folder / f"{self.host}.json"
        try:
            if read_token(mine) != self.token:
                folder.mkdir(exist_ok=True)
                tmp = folder / f".{self.host}.json.tmp"
                tmp.unlink(missing_ok=True)
                tmp.touch(mode=0o600)  # the agents (root) read it; nobody else needs the token
                tmp.write_text(json.dumps({"host": self.host, "token": self.token}))
                os.replace(tmp, mine)
        except OSError as exc:
            log.warning("cannot write %s (sharing of %s is not proven): %s", mine, datastore_dir, exc)
            return None
        return DatastoreProof(token=self.token, previous=self.previous, peers=peer_tokens(folder, self.host))


def _load(path: Path | None) -> tuple[str, str, float] | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
        return str(data["token"]), str(data.get("previous", "")), float(data["rotated_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_token(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text())
        return str(data["token"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def peer_tokens(folder: Path, host: str) -> dict[str, str]:
    """The other hosts' tokens found in ``folder`` (by host name)."""
    found: dict[str, str] = {}
    try:
        files = sorted(folder.glob("*.json"))
    except OSError:
        return found
    for path in files:
        name = path.name.removesuffix(".json")
        if name != host and (token := read_token(path)) is not None:
            found[name] = token
    return found


def has_peers(datastore_dir: Path, host: str) -> bool:
    """Whether another host keeps a file here: the directory is (or was) used by several hosts, so
    VM disks on it are opened with O_DIRECT (``cache.direct=on``), as libvirt requires for safe live
    migration on shared file systems such as NFS."""
    return bool(peer_tokens(datastore_dir / PROOF_DIR, host))
