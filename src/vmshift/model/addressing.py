"""MAC address generation and IP pool allocation: pure policy, no I/O.

The caller passes the addresses already in use (from its database); uniqueness across the
server is then enforced again by unique constraints when the allocation is stored.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Collection

from vmshift.errors import CapacityError, InvalidInputError

MAC_PREFIX = "52:54:00"  # QEMU/KVM's locally administered OUI


def generate_mac(used: Collection[str], rng: random.Random | None = None, attempts: int = 1000) -> str:
    """A random ``52:54:00:xx:xx:xx`` address not in ``used`` (case-insensitive)."""
    taken = {m.lower() for m in used}
    r = rng or random.Random()
    for _ in range(attempts):
        tail = r.getrandbits(24)
        mac = f"{MAC_PREFIX}:{tail >> 16 & 0xFF:02x}:{tail >> 8 & 0xFF:02x}:{tail & 0xFF:02x}"
        if mac not in taken:
            return mac
    raise CapacityError("No free MAC address could be found.", hint="Delete unused VMs to free addresses.")


def check_pool(cidr: str, first: str, last: str) -> ipaddress.IPv4Network:
    """Validate an IPv4 pool: first..last inside cidr, in order, not the network or broadcast address."""
    try:
        net = ipaddress.IPv4Network(cidr, strict=True)
    except ValueError as e:
        raise InvalidInputError(
            f"IP pool cidr {cidr!r} is not a valid IPv4 network: {e}.", hint="Use a form like 10.213.2.0/24."
        ) from e
    try:
        lo, hi = ipaddress.IPv4Address(first), ipaddress.IPv4Address(last)
    except ValueError as e:
        raise InvalidInputError(
            f"IP pool bounds are not valid IPv4 addresses: {e}.", hint="Use forms like 10.213.2.100."
        ) from e
    if lo not in net or hi not in net:
        raise InvalidInputError(
            f"IP pool range {first}-{last} is not inside {cidr}.",
            hint="Choose first and last inside the network.",
        )
    if lo > hi:
        raise InvalidInputError(
            f"IP pool first address {first} is after last address {last}.", hint="Swap first and last."
        )
    if net.prefixlen < 31 and (lo == net.network_address or hi == net.broadcast_address):
        raise InvalidInputError(
            "IP pool range must not include the network or broadcast address.",
            hint="Start after the network address and end before the broadcast address.",
        )
    return net


def allocate_ip(cidr: str, first: str, last: str, used: Collection[str]) -> str:
    """The lowest address of the pool not in ``used``."""
    check_pool(cidr, first, last)
    taken = {ipaddress.IPv4Address(a) for a in used}
    addr = ipaddress.IPv4Address(first)
    end = ipaddress.IPv4Address(last)
    while addr <= end:
        if addr not in taken:
            return str(addr)
        addr += 1
    raise CapacityError(
        f"The IP pool {first}-{last} has no free address.",
        hint="Widen the network's pool or delete VMs that use it.",
    )


def prefixed(address: str, cidr: str) -> str:
    """``ADDR/PREFIX``: the address with the prefix length of its network."""
    return f"{address}/{ipaddress.IPv4Network(cidr).prefixlen}"


def ip_kernel_arg(address: str, cidr: str) -> str:
    """The guest kernel argument that tells the lab guest its address."""
    return f"vmshift.ip={prefixed(address, cidr)}"
