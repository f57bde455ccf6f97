"""States and kinds shared by every layer. Always enums, never bare strings."""

from __future__ import annotations

from enum import StrEnum


class PowerState(StrEnum):
    POWERED_OFF = "poweredOff"
    POWERED_ON = "poweredOn"
    PAUSED = "paused"
    UNKNOWN = "unknown"


class ConnectionState(StrEnum):
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"


class TaskState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCESS = "success"
    ERROR = "error"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (TaskState.SUCCESS, TaskState.ERROR, TaskState.CANCELLED)


class Accelerator(StrEnum):
    KVM = "kvm"
    TCG = "tcg"


class BootKind(StrEnum):
    KERNEL = "kernel"
    DISK = "disk"


class PowerAction(StrEnum):
    START = "start"
    STOP = "stop"
    SHUTDOWN = "shutdown"
    RESET = "reset"


class EventSeverity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
