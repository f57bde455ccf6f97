"""What a client may send: the name patterns and the bounds of every number, defined once.

Names are matched whole: the pattern is anchored and checked with ``re.fullmatch`` (Python's
``$`` also matches before a trailing newline, so ``"web-1\\n"`` would slip through ``re.match``).
The same pattern goes into the OpenAPI schema (ECMA-262 ``$`` has no such exception), so a client
generated from the spec refuses what the server refuses. docs/api.md, "Input rules".
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from annotated_types import Ge, Le
from pydantic import AfterValidator, WithJsonSchema

NAME_MAX = 63
NAME_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{NAME_MAX - 1}}}$"
NAME_RULE = f"1-{NAME_MAX} letters, digits, '.', '_' or '-', starting with a letter or digit"

#: Network labels are the agents' port-group names ("VM Network"): a name that may hold single
#: inner spaces, and never starts or ends with one.
LABEL_PATTERN = rf"^[A-Za-z0-9](?:[A-Za-z0-9._ -]{{0,{NAME_MAX - 2}}}[A-Za-z0-9._-])?$"
LABEL_RULE = f"1-{NAME_MAX} letters, digits, spaces, '.', '_' or '-', starting with a letter or digit"

#: Free text handed to a guest kernel or a cron parser: printable, no control characters.
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]*$"

#: One OpenSSH public key line: its type, the base64 key, an optional comment (no control characters).
SSH_KEY_PATTERN = (r"^(?:ssh-(?:rsa|ed25519|dss)|ecdsa-sha2-nistp(?:256|384|521)|sk-(?:ssh-ed25519|"
                   r"ecdsa-sha2-nistp256)@openssh\.com) [A-Za-z0-9+/]+={0,3}(?: [^\x00-\x1f\x7f]*)?$")
MAX_SSH_KEY = 8192  # a 16384-bit RSA key is about 2.8 KB in base64
MAX_SSH_KEYS = 16

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
IPV4_PATTERN = rf"^(?:{_OCTET}\.){{3}}{_OCTET}$"
CIDR_PATTERN = rf"^(?:{_OCTET}\.){{3}}{_OCTET}/(?:3[0-2]|[12]?[0-9])$"
_PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
#: HOST:PORT of an agent: a DNS name or IPv4 address, or [IPv6]; the port 1-65535.
_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])"
ADDRESS_PATTERN = rf"^{_HOST}:{_PORT}$"

ID_MAX = 2**31 - 1  # ids are PostgreSQL INTEGER columns
MAX_CPUS = 64
MIN_MEMORY_MIB = 16
MAX_MEMORY_MIB = 4 << 20  # 4 TiB
MAX_DISKS = 16
MAX_DISK_MIB = 16 << 20  # 16 TiB
MAX_NICS = 8
MAX_KERNEL_ARGS = 2048  # Linux's COMMAND_LINE_SIZE on x86
MAX_CRON = 100
MAX_DOWNTIME_MS = 60_000  # a VM paused for more than a minute is no longer a live migration
MAX_RATE_BPS = 1e12  # bytes/s: a terabyte per second, well above any link
MAX_DURATION_S = 86_400.0  # a day: the longest timeout, post-copy delay or grace any request may ask
MAX_MIGRATION_LIMIT = 64
PAGE_DEFAULT = 500  # items per page of a list call when the client sends no 'limit' (docs/api.md)
PAGE_MAX = 1000  # the longest page a list call returns: a client pages with the cursor for more

#: What each pattern asks for, in words (the API's refusals say this rather than the regex).
PATTERN_RULES = {
    NAME_PATTERN: NAME_RULE,
    LABEL_PATTERN: LABEL_RULE,
    TEXT_PATTERN: "printable text without control characters (no newlines or tabs)",
    SSH_KEY_PATTERN: "one OpenSSH public key line such as 'ssh-ed25519 AAAAC3Nza... user@host'",
    IPV4_PATTERN: "an IPv4 address such as 10.0.0.10",
    CIDR_PATTERN: "an IPv4 network such as 10.0.0.0/24",
    ADDRESS_PATTERN: "HOST:PORT with a port of 1-65535, such as 192.0.2.10:8101",
}

_NAME_RE = re.compile(NAME_PATTERN.removeprefix("^").removesuffix("$"))
_LABEL_RE = re.compile(LABEL_PATTERN.removeprefix("^").removesuffix("$"))


def shown(value: object, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error message quotes what was sent, not all of it."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def check_name(name: str, what: str = "VM") -> str:
    """``name`` if it is a valid object name, else ValueError saying the rule."""
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"{what} name {shown(name)} is not valid: use {NAME_RULE}")
    return name


def check_label(label: str, what: str = "Network") -> str:
    if not _LABEL_RE.fullmatch(label):
        raise ValueError(f"{what} name {shown(label)} is not valid: use {LABEL_RULE}")
    return label


def _string_schema(pattern: str, max_length: int, description: str) -> dict[str, Any]:
    return {"type": "string", "pattern": pattern, "minLength": 1, "maxLength": max_length,
            "description": description}  # fmt: skip


def _named(what: str) -> Any:
    return AfterValidator(lambda v: check_name(v, what))


_NAME_SCHEMA = WithJsonSchema(_string_schema(NAME_PATTERN, NAME_MAX, NAME_RULE))

#: A VM, host, datastore, cluster, datacenter, schedule, image or CPU model name (in a body or a path).
Name = Annotated[str, _named("The"), _NAME_SCHEMA]
VmName = Annotated[str, _named("VM"), _NAME_SCHEMA]
HostName = Annotated[str, _named("Host"), _NAME_SCHEMA]
DatastoreName = Annotated[str, _named("Datastore"), _NAME_SCHEMA]
ClusterName = Annotated[str, _named("Cluster"), _NAME_SCHEMA]
DatacenterName = Annotated[str, _named("Datacenter"), _NAME_SCHEMA]
ScheduleName = Annotated[str, _named("Schedule"), _NAME_SCHEMA]
ImageName = Annotated[str, _named("Image"), _NAME_SCHEMA]
#: A network label (may contain inner spaces: "VM Network").
NetworkName = Annotated[
    str, AfterValidator(check_label), WithJsonSchema(_string_schema(LABEL_PATTERN, NAME_MAX, LABEL_RULE))
]

#: The id of a task, migration or schedule (in a path).
ObjectId = Annotated[int, Ge(1), Le(ID_MAX)]
