"""JSON pieces of list answers (server/api/json_pieces.py): kept while their source is equal."""

from __future__ import annotations

from pydantic import BaseModel, TypeAdapter

from vmshift.server.api.json_pieces import JsonPieces, json_list


class Item(BaseModel):
    name: str
    n: int


def test_a_piece_is_made_again_only_when_its_source_differs() -> None:
    made: list[int] = []
    pieces: JsonPieces[int] = JsonPieces(max_kept=10)

    def make(n: int) -> bytes:
        made.append(n)
        return TypeAdapter(Item).dump_json(Item(name="x", n=n))

    assert pieces.get(1, ("x", 1), lambda: make(1)) == b'{"name":"x","n":1}'
    assert pieces.get(1, ("x", 1), lambda: make(1)) == b'{"name":"x","n":1}'
    assert pieces.get(1, ("x", 2), lambda: make(2)) == b'{"name":"x","n":2}'
    assert made == [1, 2]


def test_more_keys_than_kept_start_over_and_stay_right() -> None:
    pieces: JsonPieces[int] = JsonPieces(max_kept=2)
    for key in range(5):
        assert pieces.get(key, key, lambda key=key: str(key).encode()) == str(key).encode()  # type: ignore[misc]
    assert pieces.get(0, "other", lambda: b"new") == b"new"


def test_a_joined_list_is_what_the_list_adapter_dumps() -> None:
    items = [Item(name="a", n=1), Item(name="b", n=2)]
    one = TypeAdapter(Item)
    assert json_list([one.dump_json(i) for i in items]) == TypeAdapter(list[Item]).dump_json(items)
    assert json_list([]) == b"[]"
