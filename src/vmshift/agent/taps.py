"""Tap devices that connect a VM's NICs to a host bridge (iproute2 via subprocess)."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import struct
from pathlib import Path

from vmshift.errors import ConflictError, NotFoundError, VmshiftError

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000  # what QEMU asks for when it opens a tap itself (virtio-net offloads)


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


async def create_tap(name: str, bridge: str, user: str | None = None) -> None:
    """Create tap ``name`` (replacing a stale one), enslave it to ``bridge`` and bring it up; with
    ``user``, the tap belongs to that user (only its processes, and root, may attach to it)."""
    if not link_exists(bridge):
        raise NotFoundError(f"Bridge {bridge!r} does not exist on this host.",
                            hint="Create it, or fix the agent's 'networks' mapping.")
    if link_exists(name):
        if Path("/sys/class/net", name, "tun_flags").exists():
            await delete_tap(name)
        else:
            raise ConflictError(f"Network device {name!r} exists and is not a tap device.",
                                hint="Remove it; vmshift names its taps vt-<uuid prefix>-<nic>.")
    owner = ("user", user) if user else ()
    for args in (("tuntap", "add", "dev", name, "mode", "tap", *owner),
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


def open_tap(name: str) -> int:
    """Attach to the existing tap ``name`` and return the fd, to hand to QEMU (``-netdev tap,fd=N``):
    QEMU then needs neither /dev/net/tun nor the right to attach. The caller closes its copy."""
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
        fcntl.ioctl(fd, _TUNSETIFF, ifr)
    except OSError as exc:
        os.close(fd)
        raise NetworkError(f"Could not open tap {name!r}: {exc.strerror}.",
                           hint="Check that the agent runs as root and the tap exists.") from exc
    return fd
