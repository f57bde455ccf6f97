"""One error tree for all of vmshift.

Every error carries a one-sentence message saying what is wrong and, where it helps, a ``hint``
saying what to do. Boundaries translate foreign exceptions into this tree (QMP errors become
``QemuError``, HTTP failures become ``ApiError``) and keep the cause in ``__cause__``.
``status`` is the HTTP status the REST layers answer with.

Callers decide from the error, not from status numbers (kopf's permanent vs temporary errors):
``retryable`` says whether the same request may succeed later without anyone changing anything (a
host that did not answer, a peer that is restarting); ``not_found`` says the named object does not
exist where it was asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx


class VmshiftError(Exception):
    """Root of every error vmshift raises on purpose."""

    status: int = 500
    code: str = "internal"
    retryable: bool = False
    not_found: bool = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} {self.hint}"

    def to_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "hint": self.hint}


class InvalidInputError(VmshiftError):
    """The request itself is wrong (malformed, out of range, inconsistent)."""

    status = 400
    code = "invalid_input"


class AuthError(VmshiftError):
    """Missing or wrong bearer token."""

    status = 401
    code = "unauthorized"


class ForbiddenError(VmshiftError):
    """The caller is known (its TLS certificate) but may not do this."""

    status = 403
    code = "forbidden"


class NotFoundError(VmshiftError):
    """A named object (host, VM, datastore, network, task...) does not exist."""

    status = 404
    code = "not_found"
    not_found = True


class ConflictError(VmshiftError):
    """The request clashes with the current state (duplicate name, VM running, host busy...)."""

    status = 409
    code = "conflict"


class IncomingFailedError(ConflictError):
    """The target could not load the migration stream: the VM never ran there and is gone from it."""

    code = "incoming_failed"


class StreamCompletedError(ConflictError):
    """The target received the whole migration stream (or runs the VM): it is never rolled back."""

    code = "stream_completed"


class SwitchoverStartedError(ConflictError):
    """A cancel came once QEMU had started the switchover: it finishes or fails on its own."""

    code = "switchover_started"


class CapacityError(VmshiftError):
    """The target lacks the resources (memory, CPU features) the request needs."""

    status = 422
    code = "insufficient_capacity"


class HostUnreachableError(VmshiftError):
    """An agent could not be reached over HTTP."""

    status = 502
    code = "host_unreachable"
    retryable = True


class StreamUnsupportedError(VmshiftError):
    """An agent has no host stream (an older agent): the server polls it instead."""

    status = 501
    code = "stream_unsupported"


class UntrustedPeerError(VmshiftError):
    """A TLS peer's certificate does not verify against the CA we trust (or does not name the peer)."""

    status = 502
    code = "untrusted_peer"


class StorageError(VmshiftError):
    """A storage target (tgtd, an iSCSI portal) or the storage role managing it failed or is away."""

    status = 503
    code = "storage_unavailable"


class QemuError(VmshiftError):
    """QEMU failed to start, or a QMP command failed."""

    status = 500
    code = "qemu_error"


RETRYABLE_STATUSES = frozenset({502, 503, 504})
"""Gateway and availability answers: the peer (or one behind it) was down or busy, not the request wrong."""

RETRYABLE_CODES = frozenset({HostUnreachableError.code})
"""Remote error codes of the classes above whose ``retryable`` is true."""


class ApiError(VmshiftError):
    """An HTTP API answered with an error; carries the remote status and code, and classifies them
    as ``retryable`` and ``not_found`` so callers need not know status numbers."""

    code = "api_error"

    def __init__(
        self, message: str, *, status: int = 500, code: str = "api_error", hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.code = code
        self.retryable = status in RETRYABLE_STATUSES or code in RETRYABLE_CODES
        self.not_found = status == 404 or code == NotFoundError.code

    @classmethod
    def from_response(cls, resp: httpx.Response, fallback: str) -> ApiError:
        """A vmshift API's `{"error": {"code", "message", "hint"}}` answer as an ApiError with its
        status; ``fallback`` is the message when the body carries no such error."""
        try:
            body = resp.json()
        except ValueError:
            body = None
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict) and err.get("message"):
            hint = err.get("hint")
            return cls(str(err["message"]), status=resp.status_code, code=str(err.get("code") or "api_error"),
                       hint=hint if isinstance(hint, str) else None)
        return cls(fallback, status=resp.status_code)


class LabError(VmshiftError):
    """The local lab could not be built, used or torn down."""

    status = 500
    code = "lab_error"


class ImageError(VmshiftError):
    """The guest image could not be built or found."""

    status = 500
    code = "image_error"
