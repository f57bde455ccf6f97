"""Scheduled migrations as the API returns them (docs/schedules.md).

A schedule names a VM, a time (``at``, once) or a cron expression (``cron``, in ``timezone``), and the
migrate request it starts (a ``MigrationCreate``). Each due time it fires becomes one ``ScheduleRun``:
started (it names the migration) or skipped (it says why). Times on the wire are timezone-aware UTC.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field, field_validator, model_validator

from vmshift.model.base import RequestModel
from vmshift.model.inputs import MAX_CRON, TEXT_PATTERN, ScheduleName, VmName
from vmshift.model.migration import MigrationCreate, MigrationStatus

#: An IANA zone name as the tz database spells them ("Europe/Berlin", "America/Argentina/Buenos_Aires").
ZONE_PATTERN = r"^[A-Za-z][A-Za-z0-9_+-]*(?:/[A-Za-z0-9_+-]+){0,2}$"


class ScheduleRunOutcome(StrEnum):
    """What became of one due time of a schedule."""

    #: The server took the due time (and moved the schedule on) but has not started the migration
    #: yet. A server that stops here leaves the run claimed; the next start marks it skipped, so a
    #: crash between claim and start never starts the same due time twice.
    CLAIMED = "claimed"
    STARTED = "started"  # a migration task was started: see migration_id
    SKIPPED = "skipped"  # checks failed, the VM was busy, the time was missed: see message


class ScheduleCreate(RequestModel):
    """Body of ``POST /schedules``: exactly one of ``at`` and ``cron``."""

    vm: VmName
    name: ScheduleName | None = Field(default=None, description="unique; default VM-ID")
    at: datetime | None = Field(default=None, description="once, at this time (with a zone)")
    cron: str | None = Field(default=None, max_length=MAX_CRON, pattern=TEXT_PATTERN,
                             description="a five-field cron expression, e.g. '0 2 * * *'")
    timezone: str = Field(default="UTC", max_length=64, pattern=ZONE_PATTERN,
                          description="IANA zone the cron expression is read in")
    migrate: MigrationCreate = Field(description="the migrate request each run sends")

    @field_validator("at")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.tzinfo is None:
            raise ValueError("'at' must carry a time zone (e.g. 2026-12-01T02:00:00Z)")
        return v

    @model_validator(mode="after")
    def _one_time(self) -> ScheduleCreate:
        if (self.at is None) == (self.cron is None):
            raise ValueError("give exactly one of 'at' (once) and 'cron' (repeating)")
        if self.migrate.check_only or self.migrate.dry_run:
            raise ValueError("a scheduled migration cannot be a check-only or dry run")
        if self.migrate.host is None and self.migrate.datastore is None:
            raise ValueError("the migrate request names no target: give a host, a datastore, or both")
        return self


class ScheduleRun(BaseModel):
    id: int
    due_at: datetime = Field(description="the due time this run is for (UTC)")
    claimed_at: datetime
    outcome: ScheduleRunOutcome
    message: str | None = Field(default=None, description="why it was skipped, or what it started")
    migration_id: int | None = None
    task_id: int | None = None
    migration_status: MigrationStatus | None = Field(default=None, description="the migration's status now")


class Schedule(BaseModel):
    id: int
    name: str
    vm: str
    at: datetime | None = None
    cron: str | None = None
    timezone: str = "UTC"
    next_due_at: datetime | None = Field(default=None, description="None: a one-time schedule that is done")
    created_at: datetime
    migrate: MigrationCreate
    runs: list[ScheduleRun] = Field(default_factory=list, description="newest first")


__all__ = ["Schedule", "ScheduleCreate", "ScheduleRun", "ScheduleRunOutcome"]
