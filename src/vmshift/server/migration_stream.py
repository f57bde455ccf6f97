"""A live migration's memory stream as the server sets it up (issue 9, items 2 and 3).

- **Where it goes**: the server builds ``tcp:ADDRESS:PORT`` itself, from the migration address it
  registered for the target (the host's facts) and the port the target reports in ``Incoming.port``.
  The target's own ``uri`` string is never passed on; a target that answers anything else (an
  ``exec:`` or ``file:`` URI, another address) stops the migration before the source does anything.
- **Whether it is encrypted**: decided again from the hosts' current certificates and settings just
  before the target is prepared (a host may have lost its certificate while the migration queued),
  by ``vmshift.migration.encryption``; the decision is recorded as ``migration.encrypted`` until the
  source reports what its QEMU does, and an opportunistic migration that falls back to plain leaves
  a warning event on the VM.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from vmshift.errors import ConflictError, VmshiftError
from vmshift.migration.encryption import EncryptionRefusal, HostEncryption, decide_encryption
from vmshift.migration.uri import MigrationUriError, check_nbd_uri, migration_ip, tcp_uri
from vmshift.model.agent_migration import Incoming, MigrationTls
from vmshift.model.api import EventKind
from vmshift.model.enums import EventSeverity
from vmshift.model.migration import MigrationSettings
from vmshift.server.db.schema import HostRow
from vmshift.server.events import record_event
from vmshift.server.inventory import host_facts
from vmshift.server.migration_store import get_migration_row, migration_parties


class TargetAnswerError(VmshiftError):
    """The target agent answered prepare with something the server does not pass on."""

    status = 502
    code = "bad_target_answer"


@dataclass(frozen=True, slots=True)
class StreamPlan:
    source: str
    target: str
    target_migration_address: str
    encrypt: bool
    warning: str | None = None

    @property
    def target_tls(self) -> MigrationTls | None:
        """For the target: only the source host may connect (``tls-authz``)."""
        return MigrationTls(peer=self.source) if self.encrypt else None

    @property
    def source_tls(self) -> MigrationTls | None:
        """For the source: the certificate it connects to must name the target host."""
        return MigrationTls(peer=self.target) if self.encrypt else None

    def uri(self, incoming: Incoming) -> str:
        """``tcp:`` to the target's registered migration address and the port it reported."""
        if incoming.port is None:
            raise TargetAnswerError(
                f"Host {self.target} answered no port for the migration stream (uri {incoming.uri!r}), "
                "so the migration stopped before the source started.",
                hint=f"Update the agent on {self.target}: it must report the port it listens on.",
            )
        uri = tcp_uri(self.target_migration_address, incoming.port)
        if incoming.uri and incoming.uri != uri:
            raise TargetAnswerError(
                f"Host {self.target} answered the migration URI {incoming.uri!r} instead of {uri!r}, "
                "so the migration stopped before the source started.",
                hint=f"Check the agent on {self.target} (its configuration and version); the VM keeps "
                "running on its source.",
            )
        for export in incoming.nbd:  # a relocate's disk exports: on the same address only
            try:
                check_nbd_uri(export.uri, self.target_migration_address)
            except MigrationUriError as e:
                raise TargetAnswerError(f"Host {self.target} answered the disk export {export.uri!r}, which "
                                        "is not on its migration address, so the migration stopped before "
                                        "the source started.", hint=e.hint) from e
        return uri


def _tls(h: HostRow) -> HostEncryption:
    return HostEncryption(h.name, h.migration_encryption, h.cert_fingerprint is not None)


def plan_stream(sessions: sessionmaker[Session], migration_id: int) -> StreamPlan:
    """The stream of migration ``migration_id`` now: raises ConflictError when encryption is required
    and a host cannot encrypt, MigrationUriError when the target's migration address is no IP."""
    with sessions() as s:
        row = get_migration_row(s, migration_id)
        vm, src, dst = migration_parties(s, row)
        settings = MigrationSettings.model_validate(row.settings or {})
        decision = decide_encryption(row.vm, vm.migration_encryption, settings.encryption,
                                     _tls(src), _tls(dst))
        address = host_facts(dst).migration_address
    if isinstance(decision, EncryptionRefusal):
        raise ConflictError(decision.message, hint=decision.hint)
    migration_ip(address)  # a host name is refused here, before the target is asked for anything
    return StreamPlan(src.name, dst.name, address, decision.encrypt, decision.warning)


def record_stream(sessions: sessionmaker[Session], migration_id: int, plan: StreamPlan) -> None:
    """``encrypted`` as decided (the source's report replaces it), and the warning of a plain fallback."""
    with sessions.begin() as s:
        row = get_migration_row(s, migration_id)
        row.encrypted = plan.encrypt
        if plan.warning is not None:
            record_event(s, EventKind.MIGRATION_UNENCRYPTED, row.vm,
                         f"Migration {migration_id}: {plan.warning}", EventSeverity.WARNING)
