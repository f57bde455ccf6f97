"""What the OpenAPI document says about refusals: one error body, the statuses each route returns.

Every route lists the statuses it can really answer with (FastAPI would otherwise document only its
own 422 shape, which vmshift never sends); the body of each is ``ErrorBody``. ``tests/server/
test_api_fuzz.py`` holds the document to it: Schemathesis flags any status a route answers with
that is not listed here.
"""

from __future__ import annotations

from typing import Any

from vmshift.model.api import ErrorBody

_WHY = {
    400: "The body is not valid JSON, or a value breaks a rule the schema cannot express "
    "(two fields that disagree, a time in the past, an unknown time zone).",
    401: "The request has no bearer token, or the wrong one.",
    404: "An object the request names does not exist (the hint lists those that do).",
    409: "The request clashes with the current state (a duplicate name, a VM that is running...).",
    422: "A field or parameter is missing, unknown, malformed or out of its bounds (the message names "
    "it), or the target lacks the resources the request needs.",
    502: "A host's agent could not be reached, or answered with an error.",
}


Responses = dict[int | str, dict[str, Any]]


def errors(*statuses: int, extra: Responses | None = None) -> Responses:
    """The ``responses=`` of a route: each status with its reason and the error body."""
    out: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorBody, "description": _WHY[s]} for s in sorted(statuses)
    }
    out.update(extra or {})
    return out


#: Every route of the server (added where the routers are included).
COMMON = errors(401)
#: The same for a route whose answer is not JSON (``/metrics``): FastAPI would document the error
#: body under the route's own media type, so the JSON one is spelt out (ErrorBody is a component
#: because the other routes use it).
COMMON_TEXT_ROUTE: Responses = {
    401: {"description": _WHY[401],
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}},
}  # fmt: skip
#: A route with path or query parameters.
PARAMS = (422,)
#: A route with a JSON body: malformed JSON is 400, a bad field 422.
BODY = (400, 422)
