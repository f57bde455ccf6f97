"""The capability the server mints for one migration (``PeerGrant``) and how long it lives."""

from __future__ import annotations

import datetime as dt
import secrets

from vmshift.model.agent_migration import PeerGrant
from vmshift.model.migration import MigrationSettings

GIB = 1 << 30
#: Beyond the migration's own timeout: preparing the target, the switchover, the confirm.
GRANT_MARGIN_S = 600.0


def grant_lifetime_s(settings: MigrationSettings, moved_bytes: int) -> float:
    """The migration's timeout (as the convergence policy computes it) plus a margin."""
    return max(settings.timeout_min_s, settings.timeout_s_per_gib * moved_bytes / GIB) + GRANT_MARGIN_S


def mint_grant(peer: str, lifetime_s: float, now: dt.datetime | None = None) -> PeerGrant:
    """A new capability for ``peer`` (the source host's name), unguessable (256 bits)."""
    start = now or dt.datetime.now(dt.UTC)
    return PeerGrant(peer=peer, capability=secrets.token_urlsafe(32),
                     expires_at=start + dt.timedelta(seconds=lifetime_s))
