"""The one migration URI a live migration may use: ``tcp:ADDRESS:PORT`` to the target's registered
migration address (issue 9, item 3; docs/migration-uri.md).

QEMU's ``migrate`` command picks its transport from the URI's scheme: ``exec:`` runs a shell command
as the QEMU user (root today), ``file:``, ``unix:`` and ``fd:`` reach local files and sockets,
``rdma:`` a device. A target agent that answered any of them would make the source run or write
what the target chose. So the server builds the URI itself, from the address it registered for the
target and the port the target reports, and the source agent accepts nothing else.

Pure, and deliberately narrow: a literal IPv4 address or a bracketed IPv6 address (no host names,
which could resolve to anything; no IPv6 zone), a decimal port 1-65535, and nothing before or after
(a trailing newline or space is refused, not stripped).
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address, ip_address

from vmshift.errors import InvalidInputError

IpAddress = IPv4Address | IPv6Address

_TCP_URI = re.compile(r"tcp:(?:(?P<v4>[0-9.]{7,15})|\[(?P<v6>[0-9A-Fa-f:.]{2,45})\]):(?P<port>[0-9]{1,5})")
_NBD_URI = re.compile(r"nbd://(?:(?P<v4>[0-9.]{7,15})|\[(?P<v6>[0-9A-Fa-f:.]{2,45})\]):(?P<port>[0-9]{1,5})"
                      r"/(?P<export>[A-Za-z0-9._-]{1,64})")
_HINT = "Only tcp:ADDRESS:PORT to the target's registered migration address is accepted."


class MigrationUriError(InvalidInputError):
    """A migration URI that is not ``tcp:`` to the target's migration address (answered with 400)."""

    code = "invalid_migration_uri"


def migration_ip(address: str) -> IpAddress:
    """A host's registered migration address as an IP address (a host name is refused)."""
    try:
        return ip_address(address)
    except ValueError:
        raise MigrationUriError(
            f"The migration address {address!r} is not an IP address.",
            hint="Set 'migration_address' in the agent's configuration to the host's IP address "
            "on the migration network.",
        ) from None


def tcp_uri(address: str, port: int) -> str:
    """``tcp:ADDRESS:PORT`` for QEMU (IPv6 in brackets), from a migration address and a port."""
    ip = migration_ip(address)
    if not 1 <= port <= 65535:
        raise MigrationUriError(f"Port {port} is not a TCP port (1-65535).", hint=_HINT)
    host = f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
    return f"tcp:{host}:{port}"


def parse_tcp_uri(uri: str) -> tuple[IpAddress, int]:
    """The address and port of a ``tcp:IPv4:PORT`` or ``tcp:[IPv6]:PORT`` URI; anything else raises."""
    m = _TCP_URI.fullmatch(uri)
    if m is None:
        raise MigrationUriError(f"The migration URI {uri!r} is refused: it is not tcp:IP-ADDRESS:PORT.",
                                hint=_HINT)
    text = m.group("v4") or m.group("v6")
    try:
        ip = ip_address(text)
    except ValueError:
        raise MigrationUriError(f"The migration URI {uri!r} is refused: {text!r} is not an IP address.",
                                hint=_HINT) from None
    if ip.version != (6 if m.group("v6") else 4):
        raise MigrationUriError(f"The migration URI {uri!r} is refused: only IPv6 goes in brackets.",
                                hint=_HINT)
    port = int(m.group("port"))
    if not 1 <= port <= 65535:
        raise MigrationUriError(f"The migration URI {uri!r} is refused: port {port} is not 1-65535.",
                                hint=_HINT)
    return ip, port


def check_migration_uri(uri: str, migration_address: str) -> int:
    """Accept ``uri`` only as ``tcp:`` to ``migration_address`` (the target's); return its port."""
    ip, port = parse_tcp_uri(uri)
    if not migration_address:
        raise MigrationUriError(f"The migration URI {uri!r} is refused: the request names no migration "
                                "address of its target to check it against.", hint=_HINT)
    expected = migration_ip(migration_address)
    if ip != expected:
        raise MigrationUriError(
            f"The migration URI {uri!r} is refused: it points to {ip.compressed}, not to the target's "
            f"migration address {expected.compressed}.",
            hint=_HINT,
        )
    return port


def check_nbd_uri(uri: str, migration_address: str) -> None:
    """A relocate's disk export: ``nbd://ADDRESS:PORT/EXPORT`` on the target's migration address only
    (the source's mirror connects there; a target must not point it at another host or socket)."""
    m = _NBD_URI.fullmatch(uri)
    hint = "A disk export must be nbd://ADDRESS:PORT/EXPORT on the target's registered migration address."
    if m is None:
        raise MigrationUriError(f"The disk export {uri!r} is refused: it is not nbd://IP-ADDRESS:PORT/NAME.",
                                hint=hint)
    try:
        host = m.group("v4") or f"[{m.group('v6')}]"
        ip = parse_tcp_uri(f"tcp:{host}:{m.group('port')}")[0]
    except MigrationUriError:
        raise MigrationUriError(f"The disk export {uri!r} is refused: its address or port is not valid.",
                                hint=hint) from None
    if ip != migration_ip(migration_address):
        raise MigrationUriError(f"The disk export {uri!r} is refused: it is not on the target's migration "
                                f"address {migration_address}.", hint=hint)
