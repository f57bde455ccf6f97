"""Tap devices that connect a VM's NICs to a host bridge (iproute2 via subprocess)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from vmshift.errors import ConflictError, NotFoundError, VmshiftError

log = logging.getLogger(__name__)


class NetworkError(VmshiftError):
    status = 500
    code = "network_error"


async def _ip(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "ip", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


async def create_tap(name: str, bridge: str) -> None:
    """Create tap ``name`` (replacing a stale one), enslave it to ``bridge`` and bring it up."""
    if not link_exists(bridge):
        raise NotFoundError(f"Bridge {bridge!r} does not exist on this host.",
                            hint="Create it, or fix the agent's 'networks' mapping.")
    if link_exists(name):
        if Path("/sys/class/net", name, "tun_flags").exists():
            await delete_tap(name)
        else:
            raise ConflictError(f"Network device {name!r} exists and is not a tap device.",
                                hint="Remove it; vmshift names its taps vt-<uuid prefix>-<nic>.")
    for args in (("tuntap", "add", "dev", name, "mode", "tap"),
                 ("link", "set", "dev", name, "master", bridge),
                 ("link", "set", "dev", name, "up")):
        rc, out = await _ip(*args)
        if rc != 0:
            await delete_tap(name)
            raise NetworkError(f"Could not set up tap {name!r} on bridge {bridge!r}: {out}.",
                               hint="Check that the agent runs as root with iproute2 installed.")


async def delete_tap(name: str) -> None:
    if link_exists(name):
        rc, out = await _ip("link", "del", "dev", name)
        if rc != 0:
            log.warning("could not delete tap %s: %s", name, out)
