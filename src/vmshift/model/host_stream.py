"""The host stream: how an agent tells the server what changed, in order, without repeats.

The server holds one long-lived ``GET /api/v1/stream?epoch=E&since=N`` per agent (newline-delimited
JSON, one message per line). The agent answers with the changes after ``since`` when it still holds
them in its change log of the same ``epoch``, else with a full snapshot first, then every change as it
happens, and a keepalive each second carrying the number of its last change.

Two pure halves meet here, so each can be tested with plain data:

* ``ChangeLog`` (agent side) numbers changes and keeps the most recent ones, to resume a stream;
* ``StreamCursor`` (server side) decides for each message whether to apply it, skip it (already
  applied: a resumed stream may repeat the tail) or resynchronise (a gap, or another epoch: the agent
  restarted and its numbers begin again).

An epoch is new at each agent start, so numbers from before a restart are never mistaken for new ones.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, TypeAdapter

from vmshift.model.host import HostFacts
from vmshift.model.vm import VmRuntime

STREAM_PATH = "/stream"  # under the agent's /api/v1
STREAM_MEDIA_TYPE = "application/x-ndjson"
KEEPALIVE_INTERVAL_S = 1.0  # the agent's keepalive period; the server's silence limit is a multiple
CHANGE_LOG_CAPACITY = 4096  # changes an agent keeps to resume a stream; older gaps get a snapshot

# VmRuntime fields that move all the time: they travel in stats reports, never as a "VM changed".
VOLATILE_VM_FIELDS = frozenset({"cpu_seconds", "rss_mib"})


class StreamKind(StrEnum):
    SNAPSHOT = "snapshot"  # everything the agent knows: facts and every VM
    VM = "vm"  # one VM's state changed (or it appeared): its full runtime
    VM_REMOVED = "vm_removed"  # a VM is no longer registered on the host
    FACTS = "facts"  # the host's facts changed (besides the volatile numbers in stats)
    STATS = "stats"  # periodic numbers: per-VM CPU and memory, host free memory and datastore space
    KEEPALIVE = "keepalive"  # each KEEPALIVE_INTERVAL_S; not a change: it carries the last change's seq


class _Message(BaseModel):
    epoch: str = Field(description="the agent's change log identity, new at each agent start")
    seq: int = Field(ge=0, description="a change: its number; a snapshot or keepalive: the last change "
                                       "it includes")


class Snapshot(_Message):
    kind: Literal[StreamKind.SNAPSHOT] = StreamKind.SNAPSHOT
    facts: HostFacts
    vms: list[VmRuntime]


class VmChanged(_Message):
    kind: Literal[StreamKind.VM] = StreamKind.VM
    vm: VmRuntime


class VmRemoved(_Message):
    kind: Literal[StreamKind.VM_REMOVED] = StreamKind.VM_REMOVED
    name: str


class FactsChanged(_Message):
    kind: Literal[StreamKind.FACTS] = StreamKind.FACTS
    facts: HostFacts


class VmStats(BaseModel):
    name: str
    cpu_seconds: float
    rss_mib: float
    cpu_cores: float = Field(default=0.0, ge=0, description="cores busy since the last stats report "
                                                           "(model/load.py); 0 on a first report")


class StatsReport(_Message):
    kind: Literal[StreamKind.STATS] = StreamKind.STATS
    vms: list[VmStats]
    memory_free_mib: int
    datastore_free_mib: dict[str, int] = Field(default_factory=dict, description="datastore uuid -> MiB free")
    # the host's capacity beside its VMs' loads (older agents send none: 0, the facts then tell)
    cpus: int = Field(default=0, ge=0, description="the host's CPU cores")
    memory_total_mib: int = Field(default=0, ge=0, description="the host's memory")
    time: float = Field(default=0.0, description="the agent's clock at the measure (s since the epoch)")


class Keepalive(_Message):
    kind: Literal[StreamKind.KEEPALIVE] = StreamKind.KEEPALIVE
    time: float = Field(description="the agent's clock (seconds since the epoch)")


StreamMessage = Annotated[
    Snapshot | VmChanged | VmRemoved | FactsChanged | StatsReport | Keepalive, Field(discriminator="kind")
]
Change = VmChanged | VmRemoved | FactsChanged | StatsReport  # what a change log holds
STREAM_MESSAGE: TypeAdapter[Snapshot | VmChanged | VmRemoved | FactsChanged | StatsReport | Keepalive] = (
    TypeAdapter(StreamMessage)
)


def encode(message: BaseModel) -> bytes:
    """One wire line."""
    return message.model_dump_json().encode() + b"\n"


def decode(line: bytes | str) -> Snapshot | VmChanged | VmRemoved | FactsChanged | StatsReport | Keepalive:
    """One wire line back; raises pydantic's ValidationError on anything else."""
    return STREAM_MESSAGE.validate_json(line)


def vm_state(rt: VmRuntime) -> dict[str, Any]:
    """What counts as a change of a VM: its runtime without the numbers that move all the time."""
    return rt.model_dump(exclude=set(VOLATILE_VM_FIELDS))


def facts_state(facts: HostFacts) -> dict[str, Any]:
    """What counts as a change of a host's facts: all but free memory and datastore space (stats)."""
    data = facts.model_dump(exclude={"memory_free_mib"})
    for ds in data["datastores"]:
        ds.pop("free_mib", None)
    return data


# ----- agent side ---------------------------------------------------------------------------------
@dataclass
class ChangeLog:
    """The agent's numbered changes: the last ``capacity`` kept, to resume a stream after a cut."""

    epoch: str
    capacity: int = CHANGE_LOG_CAPACITY
    _last_seq: int = 0
    _entries: deque[Change] = field(default_factory=deque)

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def next_seq(self) -> int:
        self._last_seq += 1
        return self._last_seq

    def append(self, change: Change) -> Change:
        """Keep a change numbered with ``next_seq`` (the caller built it with that number)."""
        if change.epoch != self.epoch or change.seq != self._last_seq:
            raise ValueError(f"change {change.epoch}/{change.seq} is not this log's next one "
                             f"({self.epoch}/{self._last_seq})")
        self._entries.append(change)
        while len(self._entries) > self.capacity:
            self._entries.popleft()
        return change

    def since(self, epoch: str | None, seq: int | None) -> list[Change] | None:
        """The changes after ``seq`` of ``epoch``; None when they cannot be given (another epoch, a
        number from the future, or changes already dropped): the stream then begins with a snapshot."""
        if epoch != self.epoch or seq is None or seq > self._last_seq:
            return None
        if seq == self._last_seq:
            return []
        oldest = self._entries[0].seq if self._entries else self._last_seq + 1
        if seq + 1 < oldest:
            return None
        return [c for c in self._entries if c.seq > seq]


# ----- server side --------------------------------------------------------------------------------
class Verdict(StrEnum):
    APPLY = "apply"  # new: apply it (a snapshot replaces what the server knew of the host)
    SKIP = "skip"  # already applied (or a keepalive that shows nothing was missed)
    RESYNC = "resync"  # a gap or another epoch: reconnect from the cursor (a snapshot, if need be)


@dataclass
class StreamCursor:
    """Where the server stands in one agent's stream; survives reconnects, not server restarts (a
    new server has applied nothing, so it asks for a snapshot)."""

    epoch: str | None = None
    seq: int = 0

    def resume_params(self) -> dict[str, str | int]:
        """The query of the next ``GET /stream``."""
        return {} if self.epoch is None else {"epoch": self.epoch, "since": self.seq}

    def accept(self, message: Snapshot | Change | Keepalive) -> Verdict:
        if isinstance(message, Snapshot):
            self.epoch, self.seq = message.epoch, message.seq
            return Verdict.APPLY
        if message.epoch != self.epoch:
            return Verdict.RESYNC
        if isinstance(message, Keepalive):
            return Verdict.RESYNC if message.seq > self.seq else Verdict.SKIP
        if message.seq <= self.seq:
            return Verdict.SKIP
        if message.seq != self.seq + 1:
            return Verdict.RESYNC
        self.seq = message.seq
        return Verdict.APPLY


def contiguous(seqs: Sequence[int]) -> bool:
    """Every number once, in order, without a gap (what a test of the applied changes checks)."""
    return all(b == a + 1 for a, b in itertools.pairwise(seqs))
