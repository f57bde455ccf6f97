"""tgtd through ``tgtadm``: one target, its file-backed LUNs and its initiator ACL.

tgtd keeps its configuration in memory only, so the storage role replays its own record after a
tgtd restart (``ensure_target`` then ``add_lun`` for each LUN). ``-C PORT`` picks the control
socket, which lets several tgtd run on one machine (one per lab).
"""

from __future__ import annotations

import asyncio
import re

from vmshift.errors import ConflictError, StorageError

TID = 1
_TARGET_RE = re.compile(r"^Target (\d+): (\S+)$", re.M)
_LUN_RE = re.compile(r"^\s+LUN: (\d+)$", re.M)
_ACL_RE = re.compile(r"ACL information:\n((?:\s+\S+\n?)*)")
#: tgtadm's answer when tgtd is not there (its socket has no listener).
_NO_DAEMON = "can't connect to the tgt daemon"
EXIST_EXIT = 22  # tgtadm: "this target/LUN/ACL already exists"


def parse_show(text: str) -> tuple[str | None, set[int], set[str]]:
    """(target IQN, LUN numbers without the controller LUN 0, ACL entries) of ``--op show`` for
    the one target tgtd serves here."""
    target = _TARGET_RE.search(text)
    luns = {int(n) for n in _LUN_RE.findall(text)} - {0}
    acl_match = _ACL_RE.search(text)
    acl = set(acl_match.group(1).split()) if acl_match else set()
    return (target.group(2) if target else None), luns, acl


class Tgtadm:
    def __init__(self, control_port: int, binary: str = "tgtadm") -> None:
        self.control_port = control_port
        self.binary = binary

    async def _run(self, *args: str, ok_exists: bool = False) -> str:
        argv = [self.binary, "-C", str(self.control_port), "--lld", "iscsi", *args]
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        text = err.decode(errors="replace").strip()
        if proc.returncode == 0 or (ok_exists and proc.returncode == EXIST_EXIT):
            return out.decode(errors="replace")
        if _NO_DAEMON in text:
            raise StorageError("tgtd is not running (tgtadm cannot reach its control socket).",
                           hint=f"Start it: tgtd -C {self.control_port}.")
        raise StorageError(f"tgtadm {' '.join(args[:4])} failed (exit {proc.returncode}): {text[:300]}",
                       hint="See tgtd's log on the storage host.")

    async def show(self) -> tuple[str | None, set[int], set[str]]:
        return parse_show(await self._run("--op", "show", "--mode", "target"))

    async def ensure_target(self, iqn: str) -> None:
        target, _, _ = await self.show()
        if target is None:
            await self._run("--op", "new", "--mode", "target", "--tid", str(TID), "-T", iqn)
        elif target != iqn:
            raise ConflictError(f"tgtd serves target {target}, not {iqn}.",
                                hint="Give each storage role its own tgtd (tgtd -C PORT).")

    async def add_lun(self, lun: int, backing_file: str) -> None:
        await self._run("--op", "new", "--mode", "logicalunit", "--tid", str(TID), "--lun", str(lun),
                        "-b", backing_file, ok_exists=True)

    async def delete_lun(self, lun: int) -> None:
        _, luns, _ = await self.show()
        if lun in luns:
            await self._run("--op", "delete", "--mode", "logicalunit", "--tid", str(TID), "--lun", str(lun))

    async def bind(self, initiator: str) -> None:
        """Admit ``initiator`` to the target (tgt's ACLs are per target, not per LUN)."""
        await self._run("--op", "bind", "--mode", "target", "--tid", str(TID), "--initiator-name",
                        initiator, ok_exists=True)
