"""The audit log: every change of the inventory records an event in the same transaction."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from vmshift.model.api import EventKind
from vmshift.model.enums import EventSeverity
from vmshift.server.db.schema import EventRow

log = logging.getLogger("vmshift.server.events")


def record_event(
    s: Session, kind: EventKind, target: str, message: str, severity: EventSeverity = EventSeverity.INFO
) -> EventRow:
    row = EventRow(kind=kind.value, target=target, message=message, severity=severity)
    s.add(row)
    log.log(
        logging.WARNING if severity is not EventSeverity.INFO else logging.INFO,
        "%s %s: %s",
        kind.value,
        target,
        message,
    )
    return row
