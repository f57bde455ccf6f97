"""States and kinds shared by every layer. Always enums, never bare strings."""

from __future__ import annotations

from enum import Enum


class PowerState(str, Enum):
    POWERED_OFF = "poweredOff"
    POWERED_ON = "poweredOn"
    PAUSED = "paused"
    UNKNOWN = "unknown"


class ConnectionState(str, Enum):
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"


class TaskState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCESS = "success"
    ERROR = "error"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (TaskState.SUCCESS, TaskState.ERROR, TaskState.CANCELLED)


class Accelerator(str, Enum):
    KVM = "kvm"
    TCG = "tcg"


class BootKind(str, Enum):
    KERNEL = "kernel"
    DISK = "disk"


class PowerAction(str, Enum):
    START = "start"
    STOP = "stop"
    SHUTDOWN = "shutdown"
    RESET = "reset"


class EventSeverity(str, Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
