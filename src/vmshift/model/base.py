"""The base class of every request body: unknown fields are refused, not dropped.

A body with a misspelt field (``"max_downtime"`` for ``"max_downtime_ms"``) would otherwise be
accepted with the default in its place: the client thinks it set a limit the server never saw.
Response models stay plain ``BaseModel`` (lenient), so a newer server may add fields to its
answers without breaking older clients.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RequestModel(BaseModel):
    """A body a client sends: ``extra="forbid"`` (the error names the unknown field)."""

    model_config = ConfigDict(extra="forbid")
