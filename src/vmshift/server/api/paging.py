"""The HTTP side of paged lists: the ``limit`` and ``cursor`` parameters, the keyset query, and the
answer (a JSON list; the next page in ``Link`` and ``X-Next-Cursor``; ``ETag`` and 304 where asked).

The body stays a plain JSON list so that a client which ignores paging still reads the first page
as before. docs/api.md, "Paging".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Header, Query, Request
from fastapi.responses import Response
from pydantic import AwareDatetime, BeforeValidator, TypeAdapter
from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute

from vmshift.errors import InvalidInputError
from vmshift.model.inputs import ID_MAX, PAGE_DEFAULT, PAGE_MAX, shown
from vmshift.model.paging import (
    CURSOR_MAX,
    CURSOR_PATTERN,
    Key,
    ListName,
    decode_cursor,
    encode_cursor,
    etag_matches,
    etag_of,
)
from vmshift.server.api.openapi import PARAMS, Responses, errors

T = TypeVar("T")
S = TypeVar("S")

NEXT_CURSOR_HEADER = "X-Next-Cursor"

_PAGE_HEADERS: dict[str, Any] = {
    "Link": {"description": 'the next page: <URL>; rel="next" (absent on the last page)',
             "schema": {"type": "string"}},
    NEXT_CURSOR_HEADER: {"description": "the 'cursor' of the next page (absent on the last page)",
                         "schema": {"type": "string"}},
}  # fmt: skip
_ETAG_HEADER: dict[str, Any] = {
    "ETag": {"description": "this page's tag: send it back in If-None-Match to get a 304 while the page "
             "is unchanged", "schema": {"type": "string"}},
}  # fmt: skip


def list_answers(model: Any, *, etag: bool = False) -> Responses:
    """The ``responses=`` of a paged list route: 200 with the paging headers, 400 (bad cursor), 422,
    and 304 for the routes that give an ETag."""
    headers = {**_PAGE_HEADERS, **(_ETAG_HEADER if etag else {})}
    extra: Responses = {200: {"model": model, "headers": headers}}
    if etag:
        extra[304] = {"description": "If-None-Match named this page's ETag: nothing on it changed",
                      "headers": headers}  # fmt: skip
    return errors(400, *PARAMS, extra=extra)


@dataclass(frozen=True)
class PageRequest:
    limit: int
    cursor: str | None
    if_none_match: str | None = None

    def after(self, lst: ListName) -> Key | None:
        """The key the page starts after (None: the first page); 400 for a cursor of another list."""
        return decode_cursor(lst, self.cursor) if self.cursor is not None else None


_LIMIT = Query(PAGE_DEFAULT, ge=1, le=PAGE_MAX, description=f"items per page (1-{PAGE_MAX})")
_CURSOR = Query(None, min_length=1, max_length=CURSOR_MAX, pattern=CURSOR_PATTERN,
                description="where the page starts: the X-Next-Cursor of the previous page")  # fmt: skip


async def page(limit: int = _LIMIT, cursor: str | None = _CURSOR) -> PageRequest:
    """The paging parameters of a list route (a FastAPI dependency; ``async`` so that FastAPI does not
    spend a thread-pool turn on it)."""
    return PageRequest(limit, cursor)


async def cached_page(
    limit: int = _LIMIT,
    cursor: str | None = _CURSOR,
    if_none_match: Annotated[str | None, Header(max_length=1000, description="an ETag of this page "
                                                "from an earlier answer: 304 while it is unchanged")] = None,
) -> PageRequest:
    """The paging parameters and If-None-Match of a list route that gives ETags."""
    return PageRequest(limit, cursor, if_none_match)


def keyset(q: Select[S], column: InstrumentedAttribute[Any], after: Key | None, limit: int, *,
           descending: bool = False) -> Select[S]:
    """``q`` ordered by the unique ``column``, starting after ``after``, one row more than a page (the
    extra row says whether a next page exists). Never OFFSET: the index finds the start."""
    if after is not None:
        q = q.where(column < after if descending else column > after)
    return q.order_by(column.desc() if descending else column.asc()).limit(limit + 1)


_ISO = "(ISO 8601 with a zone, e.g. 2026-12-01T10:00:00Z)"
_ISO_START = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]")


def _iso_text(value: object) -> object:
    """A time is written as ISO 8601 text: pydantic would also take a number as Unix seconds."""
    if isinstance(value, str) and not _ISO_START.match(value):
        raise ValueError(f"{shown(value)} is not an ISO 8601 time such as 2026-12-01T10:00:00Z")
    return value


IsoTime = Annotated[AwareDatetime, BeforeValidator(_iso_text)]
After = Annotated[IsoTime | None, Query(description=f"only those after this time {_ISO}")]
Before = Annotated[IsoTime | None, Query(description=f"only those before this time {_ISO}")]
Since = Annotated[int | None, Query(ge=0, le=ID_MAX, description="only those with an id greater than this "
                                    "(the newest id already seen)")]


def newer(q: Select[Any], id_col: InstrumentedAttribute[int], time_col: InstrumentedAttribute[Any],
          since: int | None, after: AwareDatetime | None, before: AwareDatetime | None) -> Select[Any]:
    """The ``since`` / ``after`` / ``before`` filters of the logs (both bounds exclusive)."""
    if since is not None:
        q = q.where(id_col > since)
    if after is not None:
        q = q.where(time_col > _utc(after, "after"))
    if before is not None:
        q = q.where(time_col < _utc(before, "before"))
    return q


def _utc(t: datetime, name: str) -> datetime:
    try:
        return t.astimezone(UTC)
    except OverflowError as e:  # year 1 with a positive offset, year 9999 with a negative one
        raise InvalidInputError(f"The query parameter '{name}' is out of range: {t.isoformat()} has no "
                                "UTC time.", hint="Give a time between the years 1 and 9999 in UTC.") from e


@dataclass(frozen=True)
class Page(Generic[T]):
    items: Sequence[T]
    next_cursor: str | None


def cut(rows: Sequence[T], limit: int, lst: ListName, key: Callable[[T], Key]) -> Page[T]:
    """The first ``limit`` rows of a keyset query and, when it found more, the cursor after them."""
    if len(rows) <= limit:
        return Page(rows, None)
    return Page(rows[:limit], encode_cursor(lst, key(rows[limit - 1])))


def answer(request: Request, got: Page[Any], adapter: TypeAdapter[Any], *,
           if_none_match: str | None = None, etag: bool = False) -> Response:
    """The page as a JSON list, with its next page's Link and cursor, and its ETag when ``etag``."""
    return answer_json(request, adapter.dump_json(list(got.items)), got.next_cursor,
                       if_none_match=if_none_match, etag=etag)


def answer_json(request: Request, body: bytes, next_cursor: str | None, *,
                if_none_match: str | None = None, etag: bool = False) -> Response:
    """``answer`` for a page already dumped (server/api/json_pieces.py)."""
    headers: dict[str, str] = {}
    if next_cursor is not None:
        headers[NEXT_CURSOR_HEADER] = next_cursor
        headers["Link"] = f'<{request.url.include_query_params(cursor=next_cursor)}>; rel="next"'
    if etag:
        headers["ETag"] = tag = etag_of(body, next_cursor)
        if etag_matches(if_none_match, tag):
            return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)
