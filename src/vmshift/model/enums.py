"""States and kinds shared by every layer. Always enums, never bare strings."""

from __future__ import annotations

from enum import StrEnum


class PowerState(StrEnum):
    POWERED_OFF = "poweredOff"
    POWERED_ON = "poweredOn"
    PAUSED = "paused"
    UNKNOWN = "unknown"
    # No QEMU runs: the VM's memory and device state are saved in its folder (``vmshift vm suspend``);
    # ``vmshift vm resume`` loads them and the guest continues where it stopped.
    SUSPENDED = "suspended"
    # Inventory only, never reported by an agent: the VM should run, but its host runs no QEMU for it
    # and no other host reports one (see server/reconcile.py).
    MISSING = "missing"


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
    """How a VM boots: the image's kernel and initramfs passed to QEMU (``-kernel``), or its first
    disk through the BIOS (SeaBIOS), as a real machine does."""

    KERNEL = "kernel"
    DISK = "disk"


class DatastoreKind(StrEnum):
    """Where a datastore keeps VM disks: files in its directory, or one iSCSI LUN per disk on a
    target that a storage role manages (the directory then holds only the VMs' other files)."""

    DIRECTORY = "directory"
    ISCSI = "iscsi"


class CloneMode(StrEnum):
    """How a VM's first disk is made from a disk image: a qcow2 overlay backed by the image on the
    same datastore (``linked``, instant, the image must stay), or a whole copy (``full``)."""

    LINKED = "linked"
    FULL = "full"


class PowerAction(StrEnum):
    START = "start"
    STOP = "stop"
    SHUTDOWN = "shutdown"
    RESET = "reset"
    PAUSE = "pause"  # QMP stop: the vCPUs halt, the QEMU process stays
    RESUME = "resume"  # QMP cont; refused for a QEMU that migrated away or receives a migration


class QemuRunState(StrEnum):
    """The run states QMP ``query-status`` reports (QEMU's ``RunState``, qapi/run-state.json)."""

    DEBUG = "debug"
    FINISH_MIGRATE = "finish-migrate"
    GUEST_PANICKED = "guest-panicked"
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    COLO = "colo"


# A QEMU in one of these states belongs to a live migration: resuming it by hand could run the
# guest twice (the source after it sent everything, or a target before the source confirmed).
MIGRATION_RUN_STATES = frozenset(
    {QemuRunState.INMIGRATE, QemuRunState.POSTMIGRATE, QemuRunState.FINISH_MIGRATE}
)


class EventSeverity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"  # the inventory cannot say where a VM runs, or it may run twice: act now


class MigrationKind(StrEnum):
    """What a migration moves (vSphere's names in the comments)."""

    LIVE = "live"  # vMotion: a running VM to another host, disks on shared storage
    STORAGE = "storage"  # Storage vMotion: a running VM's files to another datastore of its host
    RELOCATE = "relocate"  # vMotion without shared storage: host and datastore together, running
    COLD = "cold"  # a powered-off VM to another host and/or datastore
    SUSPENDED = "suspended"  # a suspended VM (saved state file + disks) to another host and/or datastore

    @property
    def live(self) -> bool:
        """The VM keeps running during the move (the client's connections must survive)."""
        return self in (MigrationKind.LIVE, MigrationKind.STORAGE, MigrationKind.RELOCATE)

    @property
    def copies_disks(self) -> bool:
        return self is not MigrationKind.LIVE


class DiskFormat(StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"


class MigrationEncryption(StrEnum):
    """Encrypted vMotion's three settings (vSphere's names), per VM and per host.

    ``opportunistic`` (the default): encrypted when both hosts can, else plain with a warning on the
    migration; ``required``: encrypted or refused before anything starts; ``disabled``: plain."""

    DISABLED = "disabled"
    OPPORTUNISTIC = "opportunistic"
    REQUIRED = "required"
