"""Paged lists: the opaque cursor that says where the next page starts, and the ETag of a page.

A list is read in pages of at most ``limit`` items, ordered by a unique key (the name of a named
object, the id of an event, task or migration). The next page starts after the last key of this
one: keyset paging, so a page costs the same however deep it is, and an object added or removed
meanwhile never makes another one appear twice or go missing. The cursor carries that key, and the
list it belongs to, as base64url-encoded JSON: opaque to clients (they pass it back unchanged), so
the server may change what it holds. docs/api.md, "Paging".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from enum import StrEnum

from vmshift.errors import InvalidInputError
from vmshift.model.inputs import ID_MAX, NAME_MAX, shown

#: A cursor is at most this long (a name key of 63 characters fits with room to spare).
CURSOR_MAX = 200
CURSOR_PATTERN = r"^[A-Za-z0-9_-]+$"

_CURSOR_HINT = (
    "Pass the X-Next-Cursor header (or the Link rel=\"next\" URL) of the previous page unchanged, "
    "or leave 'cursor' out to start at the first page."
)

Key = str | int


class ListName(StrEnum):
    """The paged lists, each with its sort key: a cursor of one list is refused by another."""

    VMS = "vms"
    HOSTS = "hosts"
    DATASTORES = "datastores"
    NETWORKS = "networks"
    CLUSTERS = "clusters"
    DATACENTERS = "datacenters"
    EVENTS = "events"
    TASKS = "tasks"
    MIGRATIONS = "migrations"
    SCHEDULES = "schedules"

    @property
    def keyed_by_id(self) -> bool:
        """Ids for the logs and schedules (newest first, except schedules), names for the inventory."""
        return self in (ListName.EVENTS, ListName.TASKS, ListName.MIGRATIONS, ListName.SCHEDULES)


def encode_cursor(lst: ListName, key: Key) -> str:
    raw = json.dumps({"l": lst.value, "k": key}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _bad(text: str, why: str) -> InvalidInputError:
    return InvalidInputError(f"The cursor {shown(text)} is not valid: {why}.", hint=_CURSOR_HINT)


def decode_cursor(lst: ListName, text: str) -> Key:
    """The key a cursor of ``lst`` carries; InvalidInputError (400) for anything this list did not make."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError) as e:
        raise _bad(text, "it is not a cursor this server gave out") from e
    if not isinstance(data, dict) or set(data) != {"l", "k"}:
        raise _bad(text, "it is not a cursor this server gave out")
    if data["l"] != lst.value:
        raise _bad(text, f"it belongs to another list ({shown(data['l'])}), not to {lst.value}")
    key: Key = data["k"]
    if lst.keyed_by_id:
        if not isinstance(key, int) or isinstance(key, bool) or not 1 <= key <= ID_MAX:
            raise _bad(text, "its position is not an id")
    elif not isinstance(key, str) or not 1 <= len(key) <= NAME_MAX:
        raise _bad(text, "its position is not a name")
    return key


def etag_of(body: bytes, next_cursor: str | None) -> str:
    """A strong ETag of one page: its exact body and whether (and where) a next page starts.

    Made from the answer itself rather than from a change counter, so it changes with anything the
    page shows (a VM's power state, its stats, the VMs of a host), however the row was written. The
    next cursor is part of it: a page that stays the same while an object is added after it must
    still change, or a client that trusts its cached copy would never look at the page beyond.
    """
    digest = hashlib.sha256(body)
    digest.update(b"\0" + (next_cursor or "").encode())
    return f'"{digest.hexdigest()[:32]}"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 ``If-None-Match``: ``*`` or a list of (possibly weak) tags, compared weakly."""
    if not if_none_match:
        return False
    given = [tag.strip() for tag in if_none_match.split(",")]
    return "*" in given or etag in (tag.removeprefix("W/") for tag in given)
