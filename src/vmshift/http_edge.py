"""The HTTP edge shared by the server's and the agents' APIs: bearer auth and error bodies.

Both APIs answer every failure with `{"error": {"code", "message", "hint"}}` (docs/design/contracts.md):
a `VmshiftError` keeps its status and code, request validation becomes one readable sentence that names
the field (400 for malformed JSON, else 422), a wrong method a 405 whose `Allow` lists the path's
methods, and anything unexpected becomes a 500 without a traceback.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from vmshift.errors import AuthError, VmshiftError
from vmshift.model.inputs import PATTERN_RULES, shown

log = logging.getLogger(__name__)


def error_response(
    status: int, code: str, message: str, hint: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "hint": hint}}
    return JSONResponse(status_code=status, content=body, headers=headers)


_WHERE = {"body": "body field", "query": "query parameter", "path": "path parameter", "header": "header"}
_HINTS = {
    "body": "Fix the request body and send it again.",
    "query": "Fix the query parameter and send the request again.",
    "path": "Fix the name or id in the URL and send the request again.",
    "header": "Fix the header and send the request again.",
}


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in _WHERE]
    return ".".join(parts) or "body"


def validation_message(exc: RequestValidationError) -> tuple[int, str, str]:
    """One readable sentence naming the (first) offending field, and a hint; 400 for malformed JSON,
    else 422."""
    errors = list(exc.errors())
    if not errors:
        return 422, "The request is not valid.", _HINTS["body"]
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    where = str(loc[0]) if loc and loc[0] in _WHERE else "body"
    hint = _HINTS[where]
    more = f" ({len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    kind = first.get("type")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "syntax error")
        return 400, f"The request body is not valid JSON: {detail}.", hint
    field = _field_name(loc)
    what = "Field" if where == "body" else f"The {_WHERE[where]}"
    if kind == "missing":
        return 422, f"{what} '{field}' is required{more}.", hint
    if kind == "extra_forbidden":
        return 422, f"Field '{field}' is not a field of this request{more}.", (
            "Remove it (or fix its spelling): the API's OpenAPI document lists the fields of every body."
        )
    if kind == "string_pattern_mismatch":
        pattern = first.get("ctx", {}).get("pattern", "")
        rule = PATTERN_RULES.get(pattern, f"of the form {pattern}")
        return 422, f"{what} '{field}' is invalid: {shown(first.get('input'))} is not {rule}{more}.", hint
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ").rstrip(".")
    return 422, f"{what} '{field}' is invalid: {msg}{more}.", hint


def _route_table(app: FastAPI) -> list[tuple[re.Pattern[str], frozenset[str]]]:
    """(path regex, methods) of every route: the documented operations, plus plain routes such as
    the OpenAPI document itself. Built from public pieces (the spec, ``compile_path``) once per app."""
    table: list[tuple[re.Pattern[str], frozenset[str]]] | None = getattr(app.state, "allow_table", None)
    if table is None:
        table = [
            (compile_path(path)[0], frozenset(m.upper() for m in ops))
            for path, ops in app.openapi().get("paths", {}).items()
        ]
        for route in app.router.routes:
            regex, methods = getattr(route, "path_regex", None), getattr(route, "methods", None)
            if regex is not None and methods:
                table.append((regex, frozenset(methods)))
        app.state.allow_table = table
    return table


def allowed_methods(request: Request) -> str:
    """The methods some route of the app serves at this request's path (RFC 9110's ``Allow``)."""
    path = request.url.path.removeprefix(request.scope.get("root_path", "") or "")
    methods: set[str] = set()
    for regex, route_methods in _route_table(request.app):
        if regex.match(path):
            methods |= route_methods
    return ", ".join(sorted(methods))


#: Declares the scheme in the OpenAPI document; the check itself is ``require_token``'s, so a missing
#: token is a 401 with vmshift's error body rather than FastAPI's 403.
_BEARER = HTTPBearer(
    auto_error=False, description="the API's token (the content of the server's token_file)"
)


def bearer_auth(token: str, *, hint_missing: str, hint_wrong: str) -> Callable[..., Awaitable[None]]:
    """A FastAPI dependency that accepts only `Authorization: Bearer <token>`."""

    async def require_token(
        request: Request, _declared: HTTPAuthorizationCredentials | None = Depends(_BEARER)
    ) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise AuthError("The request has no bearer token.", hint=hint_missing)
        if not secrets.compare_digest(given.strip().encode(), token.encode()):
            raise AuthError("The bearer token is wrong.", hint=hint_wrong)

    return require_token


def install_error_handlers(app: FastAPI, *, what: str, api_doc_hint: str) -> None:
    """Error bodies for VmshiftError, validation, unknown routes and unexpected failures."""

    @app.exception_handler(VmshiftError)
    async def _vmshift(_req: Request, exc: VmshiftError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.hint)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        status, message, hint = validation_message(exc)
        return error_response(status, "invalid_input", message, hint)

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:
            allow = allowed_methods(req)
            return error_response(
                405, "method_not_allowed", f"{req.method} is not allowed on {req.url.path}.",
                f"Use {allow}." if allow else api_doc_hint, headers={"Allow": allow},
            )  # fmt: skip
        code = {404: "not_found"}.get(exc.status_code, "http_error")
        message = "No such API endpoint." if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, code, message, api_doc_hint, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in the %s API", what)
        return error_response(
            500, "internal", f"The {what} failed: {type(exc).__name__}.", f"See the {what}'s log for details."
        )
