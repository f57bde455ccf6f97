"""Who may call which agent route: the decision alone, from the caller's verified certificate.

- The server's certificate (role ``vmshift-server``) may call every route.
- A host's certificate (role ``vmshift-host``) may call only what a migration's source agent calls
  on its target (``PEER_ROUTES``), and only with the capability of a live ``PeerGrant`` the server
  gave this agent for that migration and that host (``peer`` = the certificate's common name).
- Anything else (no certificate, a bootstrap certificate, another role) is refused.

Pure: the guard (agent/guard.py) gathers the facts from the request and the target's grants.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import datetime

from vmshift.errors import ForbiddenError
from vmshift.model.agent_migration import PeerGrant
from vmshift.tls.peer import CAPABILITY_HEADER, PeerIdentity
from vmshift.tls.pki import Role

#: (method, route template) a source agent calls on its target during a migration. ``/health`` is
#: the source's liveness check of the target; it names no migration, so any live grant of the
#: calling host admits it.
PEER_ROUTES = frozenset({
    ("GET", "/api/v1/migrations/{migration_id}/incoming"),
    ("POST", "/api/v1/migrations/{migration_id}/activate"),
    ("DELETE", "/api/v1/migrations/{migration_id}"),
    ("GET", "/api/v1/health"),
})


@dataclass(frozen=True)
class RouteCall:
    method: str
    route: str  # the route's template, e.g. "/api/v1/migrations/{migration_id}/activate"
    migration_id: int | None = None  # from the path, when the route names one


def _forbidden(message: str, hint: str) -> ForbiddenError:
    return ForbiddenError(message, hint=hint)


def decide(peer: PeerIdentity | None, call: RouteCall, capability: str | None,
           grants: dict[int, PeerGrant], now: datetime) -> ForbiddenError | None:
    """None: allowed; else the refusal to answer with (403). ``grants``: this agent's live grants
    by migration id (a grant is dropped when its migration ends)."""
    if peer is None:
        return _forbidden("This agent accepts only clients with a certificate of its cluster.",
                          "Call it through the vmshift server (vmshift host, vmshift vm ...).")
    if peer.role is Role.SERVER:
        return None
    if peer.role is not Role.HOST:
        return _forbidden(f"A {peer.role.value} certificate may not call this agent.",
                          "Add the host with 'vmshift host add' so the server issues its certificate.")
    if (call.method, call.route) not in PEER_ROUTES:
        return _forbidden(f"Host {peer.name!r} may not call {call.method} {call.route} on this agent.",
                          "Hosts call each other only on the migration routes the server authorised.")
    if not capability:
        return _forbidden(f"Host {peer.name!r} sent no migration capability.",
                          f"Send the capability of the migration in {CAPABILITY_HEADER}.")
    candidates = ([grants[call.migration_id]] if call.migration_id in grants else []) \
        if call.migration_id is not None else list(grants.values())
    for grant in candidates:
        if grant.peer == peer.name and hmac.compare_digest(grant.capability.encode(), capability.encode()):
            if now >= grant.expires_at:
                return _forbidden(f"The capability of host {peer.name!r} expired at "
                                  f"{grant.expires_at.isoformat()}.",
                                  "The server mints a new one for the next migration.")
            return None
    what = f"migration {call.migration_id}" if call.migration_id is not None else "a live migration"
    return _forbidden(f"Host {peer.name!r} holds no live grant for {what} on this agent.",
                      "Only the source host of a migration the server authorised may call, "
                      "and only until it ends.")
