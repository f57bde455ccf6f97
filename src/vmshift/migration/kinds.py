"""Which kind of move a migrate request asks for, from the VM's power state and what changes. No I/O."""

from __future__ import annotations

from dataclasses import dataclass

from vmshift.model.enums import MigrationKind, PowerState
from vmshift.model.migration import CheckId, CheckResult, CheckSeverity


@dataclass(frozen=True)
class MoveAsked:
    """What a request changes: the host, the datastore, or both."""

    power_state: PowerState
    host_changes: bool
    datastore_changes: bool
    host: str = "its host"  # where the VM is now, for the messages
    datastore: str = "its datastore"


def kind_of(asked: MoveAsked) -> MigrationKind | CheckResult:
    """The kind of move, or an error result saying why this request cannot be served."""
    if not asked.host_changes and not asked.datastore_changes:
        return _refuse(f"The VM already runs on {asked.host} with its files on {asked.datastore}: there is "
                       "nothing to move.",
                       "Name another host with --host, another datastore with --datastore, or both.")
    state = asked.power_state
    if state is PowerState.POWERED_ON:
        if asked.host_changes and asked.datastore_changes:
            return MigrationKind.RELOCATE
        return MigrationKind.LIVE if asked.host_changes else MigrationKind.STORAGE
    if state is PowerState.POWERED_OFF:
        return MigrationKind.COLD
    if state is PowerState.SUSPENDED:
        return MigrationKind.SUSPENDED
    if state is PowerState.PAUSED:
        return _refuse("The VM is paused: a paused VM cannot be moved.",
                       "Resume it ('vmshift vm resume') to move it live, or suspend or stop it to move it "
                       "cold.")
    return _refuse(f"The VM's power state is {state.value}: only a running, suspended or powered-off VM "
                   "moves.",
                   "Wait until its host reports it, then try again.")


def _refuse(message: str, hint: str) -> CheckResult:
    return CheckResult(check=CheckId.KIND, severity=CheckSeverity.ERROR, message=message, hint=hint)
