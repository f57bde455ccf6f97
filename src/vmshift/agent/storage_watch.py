"""Notice VMs whose iSCSI target is gone (what vSphere calls "all paths down").

Measured on QEMU 10.0.2 with libiscsi 1.19 (tgtd killed, or the storage box's link cut): the
initiator reconnects for ever and the guest's requests wait with it; the ``timeout`` of
BlockdevOptionsIscsi fails a request only while a connection is up, and after one retry the
reconnect loop holds it again, so no BLOCK_IO_ERROR comes and werror/rerror=stop never pauses
the VM. QMP ``stop`` then drains the block layer and blocks QEMU's main loop (QMP too) until the
target answers again, so the agent must not pause such a VM either.

The agent therefore watches the portals of the iSCSI datastores its running VMs use and, when one
has not accepted a connection for ``down_after_s``, reports each such VM's ``io_error`` (logged
once) while QEMU stays reachable; the VM's requests go on by themselves when the target comes
back, and the report clears.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from vmshift.agent.datastores import Datastores
from vmshift.agent.supervisor import Supervisor

log = logging.getLogger(__name__)
INTERVAL_S = 2.0
CONNECT_TIMEOUT_S = 2.0
#: How long a portal may refuse or ignore connections before its VMs are reported: longer than a
#: tgtd restart or a short network blip, well below a guest's own disk timeout (Linux: 30 s).
DOWN_AFTER_S = 10.0


async def portal_answers(portal: str, timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
    host, _, port = portal.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout_s)
    except (OSError, TimeoutError, ValueError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class StorageWatch:
    def __init__(self, supervisor: Supervisor, datastores: Datastores, down_after_s: float = DOWN_AFTER_S
                 ) -> None:
        self.supervisor = supervisor
        self.datastores = datastores
        self.down_after_s = down_after_s
        self.down_since: dict[str, float] = {}  # portal -> when it first failed to answer

    async def check(self) -> None:
        in_use = self.supervisor.running_on_iscsi()
        portals = {ds.name: ds.iscsi.portal for ds in self.datastores.all()
                   if ds.iscsi is not None and ds.name in in_use}
        for name, portal in portals.items():
            reason: str | None = None
            if await portal_answers(portal):
                if self.down_since.pop(portal, None) is not None:
                    log.info("iSCSI portal %s of datastore %s answers again", portal, name)
            else:
                down_s = time.monotonic() - self.down_since.setdefault(portal, time.monotonic())
                if down_s < self.down_after_s:
                    continue
                reason = (f"the iSCSI target of datastore {name!r} ({portal}) stopped answering "
                          f"{self.down_after_s:.0f}+ s ago: the VM's disk requests wait for it")
            for vm in sorted(in_use[name]):
                self.supervisor.mark_storage_lost(vm, reason)

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:
                log.exception("watching the iSCSI portals failed")
            await asyncio.sleep(INTERVAL_S)
