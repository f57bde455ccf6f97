"""Paged lists (model/paging.py): cursors go back to the list that made them, nothing else is taken;
a page's ETag follows its content and where the next page starts."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmshift.errors import InvalidInputError
from vmshift.model.inputs import ID_MAX, NAME_PATTERN
from vmshift.model.paging import ListName, decode_cursor, encode_cursor, etag_matches, etag_of


@given(st.from_regex(NAME_PATTERN, fullmatch=True))
def test_a_name_cursor_round_trips(name: str) -> None:
    cursor = encode_cursor(ListName.VMS, name)
    assert decode_cursor(ListName.VMS, cursor) == name
    assert cursor.replace("-", "").replace("_", "").isalnum()  # URL-safe, no padding


@given(st.integers(1, ID_MAX))
def test_an_id_cursor_round_trips(key: int) -> None:
    assert decode_cursor(ListName.EVENTS, encode_cursor(ListName.EVENTS, key)) == key


def _raw(data: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("lst", "cursor", "says"),
    [
        (ListName.VMS, encode_cursor(ListName.HOSTS, "host-1"), "belongs to another list ('hosts')"),
        (ListName.VMS, "not-a-cursor", "not a cursor this server gave out"),
        (ListName.VMS, _raw(["vms", "a"]), "not a cursor this server gave out"),
        (ListName.VMS, _raw({"l": "vms", "k": "a", "x": 1}), "not a cursor this server gave out"),
        (ListName.VMS, _raw({"l": "vms", "k": 7}), "its position is not a name"),
        (ListName.VMS, _raw({"l": "vms", "k": "x" * 64}), "its position is not a name"),
        (ListName.TASKS, _raw({"l": "tasks", "k": "7"}), "its position is not an id"),
        (ListName.TASKS, _raw({"l": "tasks", "k": True}), "its position is not an id"),
        (ListName.TASKS, _raw({"l": "tasks", "k": 0}), "its position is not an id"),
        (ListName.TASKS, _raw({"l": "tasks", "k": ID_MAX + 1}), "its position is not an id"),
    ],
)
def test_a_foreign_or_forged_cursor_is_refused_with_a_hint(lst: ListName, cursor: str, says: str) -> None:
    with pytest.raises(InvalidInputError) as got:
        decode_cursor(lst, cursor)
    assert says in got.value.message and got.value.message.endswith(".")
    assert got.value.status == 400 and "X-Next-Cursor" in (got.value.hint or "")


def test_the_etag_follows_the_body_and_the_next_page() -> None:
    tag = etag_of(b'[{"name":"vm-1","power_state":"poweredOff"}]', None)
    assert tag.startswith('"') and tag.endswith('"')
    assert etag_of(b'[{"name":"vm-1","power_state":"poweredOff"}]', None) == tag
    assert etag_of(b'[{"name":"vm-1","power_state":"poweredOn"}]', None) != tag
    assert etag_of(b'[{"name":"vm-1","power_state":"poweredOff"}]', "abc") != tag


def test_if_none_match_compares_weakly_and_takes_lists() -> None:
    tag = '"0123"'
    assert etag_matches(tag, tag) and etag_matches(f'W/{tag}', tag) and etag_matches('"x", "0123"', tag)
    assert etag_matches("*", tag)
    assert not etag_matches(None, tag) and not etag_matches("", tag) and not etag_matches('"0124"', tag)
