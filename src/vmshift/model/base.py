"""The base class of every request body: unknown fields are refused, not dropped, and so are
booleans sent for numbers.

A body with a misspelt field (``"max_downtime"`` for ``"max_downtime_ms"``) would otherwise be
accepted with the default in its place: the client thinks it set a limit the server never saw.
Pydantic's lax mode would also read ``true`` as ``1`` in an integer field (``"threshold": true``
became DRS threshold 1), which no client means; strict mode is not an option, since it would also
refuse the strings FastAPI hands over for enum fields. Response models stay plain ``BaseModel``
(lenient), so a newer server may add fields to its answers without breaking older clients.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

_NUMBERS = (int, float, type(None))


def numbers_only(annotation: Any) -> bool:
    """True for ``int``, ``float``, their optional forms and lists of them: the fields where a JSON
    boolean is a mistake rather than a value."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return numbers_only(get_args(annotation)[0])
    if origin in (Union, types.UnionType, list, tuple):
        return all(numbers_only(arg) for arg in get_args(annotation) if arg is not Ellipsis)
    return annotation in _NUMBERS and annotation is not bool


def _has_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(item, bool) for item in value)


class RequestModel(BaseModel):
    """A body a client sends: ``extra="forbid"`` (the error names the unknown field)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _has_bool(value) and numbers_only(field.annotation):
            raise ValueError("must be a number, not true or false")
        return value
