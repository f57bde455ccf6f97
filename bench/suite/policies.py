"""The migration policies of vmshift's peers, as pure control loops over QEMU's `query-migrate`.

Each peer is emulated from its own defaults (the facts and the files they come from are in
docs/performance.md, "How the peers are emulated"). A policy says what to set before `migrate`
and, for every poll, what to change; the QMP driver in `qmp_leg.py` does the I/O. No policy here
ever sees a clock or a socket, so each one is unit-tested on made-up samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from vmshift.migration.samples import MigrationSample, QemuMigrationStatus

GIB = 1 << 30
MIB = 1 << 20
#: libvirt's "unlimited" max-bandwidth: QEMU_DOMAIN_MIG_BANDWIDTH_MAX (INT64_MAX / 2**20 MiB/s) in B/s.
LIBVIRT_UNLIMITED_BPS = (((1 << 63) - 1) // MIB) * MIB
#: Proxmox's max-bandwidth when no limit is configured (16 GiB/s, QemuMigrate.pm phase2).
PROXMOX_UNLIMITED_BPS = 16 * GIB
PROXMOX_DOWNTIME_MAX_MS = 2_000_000


@dataclass(frozen=True)
class Start:
    """What a policy sets before `migrate`."""

    caps: dict[str, bool]
    params: dict[str, Any]
    poll_s: float
    #: capabilities of the receiving QEMU
    target_caps: dict[str, bool] = field(default_factory=dict)
    #: the target starts with -S and is sent `cont` once the stream completed (libvirt, Proxmox)
    target_paused: bool = False


@dataclass(frozen=True)
class Decision:
    """What a policy wants after one poll: parameters to change, or to give up."""

    params: dict[str, Any] = field(default_factory=dict)
    abort: str | None = None  # the reason, when the migration is to be cancelled
    poll_s: float | None = None  # a new poll interval from now on


class Policy(Protocol):
    name: str
    label: str
    source: str  # where its defaults come from

    def start(self, memory_mib: int) -> Start: ...

    def step(self, elapsed_s: float, sample: MigrationSample) -> Decision: ...


class QemuDefaults:
    """QEMU as it comes: 128 MiB/s, 300 ms, no capability, nobody changing anything."""

    name = "qemu-defaults"
    label = "QEMU defaults"
    source = "qemu/qemu migration/options.c (defaults, checked live on QEMU 10.0.2)"

    def start(self, memory_mib: int) -> Start:
        return Start(caps={}, params={}, poll_s=0.5)

    def step(self, elapsed_s: float, sample: MigrationSample) -> Decision:
        return Decision()


class LibvirtDefaults:
    """`virsh migrate --live` with no options, as libvirt drives QEMU: unlimited bandwidth, QEMU's
    300 ms, pause-before-switchover answered at once, return-path; no control loop, no timeout."""

    name = "libvirt-documented"
    label = "libvirt defaults (emulated)"
    source = (
        "libvirt/libvirt src/qemu/qemu_domain.h (QEMU_DOMAIN_MIG_BANDWIDTH_MAX), "
        "src/qemu/qemu_migration.c (qemuMigrationSrcRun), src/qemu/qemu_migration_params.c "
        "(qemuMigrationParamsAlwaysOn, FlagMap)"
    )

    def start(self, memory_mib: int) -> Start:
        return Start(
            caps={"events": True, "pause-before-switchover": True, "return-path": True},
            params={"max-bandwidth": LIBVIRT_UNLIMITED_BPS},
            poll_s=0.5,
            target_caps={"events": True, "return-path": True, "late-block-activate": True},
            target_paused=True,
        )

    def step(self, elapsed_s: float, sample: MigrationSample) -> Decision:
        return Decision()


def nova_data_gb(memory_mib: int) -> float:
    """nova's guest size for its timers: RAM in GiB, at least 2 (disks only count for block migration)."""
    return max(2.0, memory_mib / 1024)


def nova_downtime_steps(
    data_gb: float, downtime_ms: int = 500, steps: int = 10, delay_s_per_gb: float = 75.0
) -> list[tuple[int, int]]:
    """(seconds from start, downtime-limit ms): `steps`+1 even steps from downtime/steps to downtime."""
    delay = int(delay_s_per_gb * data_gb)
    base = downtime_ms / steps
    offset = (downtime_ms - base) / steps
    return [(delay * i, int(base + offset * i)) for i in range(steps + 1)]


class Nova:
    """OpenStack nova's libvirt driver: libvirt's defaults plus its monitor loop every 0.5 s, which
    raises downtime-limit along `downtime_steps` and aborts after 800 s per GiB."""

    name = "nova"
    label = "OpenStack nova (emulated)"
    source = (
        "openstack/nova nova/conf/libvirt.py (live_migration_downtime 500, _steps 10, _delay 75, "
        "completion_timeout 800, timeout_action abort), nova/virt/libvirt/migration.py "
        "(downtime_steps, update_downtime, should_trigger_timeout_action), "
        "nova/virt/libvirt/driver.py (_live_migration_monitor: 0.5 s, _live_migration_data_gb)"
    )

    def __init__(self) -> None:
        self._steps: list[tuple[int, int]] = []
        self._timeout_s = 0.0
        self._current: int | None = None

    def start(self, memory_mib: int) -> Start:
        gb = nova_data_gb(memory_mib)
        self._steps = nova_downtime_steps(gb)
        self._timeout_s = float(int(800 * gb))
        self._current = None
        return LibvirtDefaults().start(memory_mib)

    def step(self, elapsed_s: float, sample: MigrationSample) -> Decision:
        if sample.status is QemuMigrationStatus.POSTCOPY_ACTIVE:
            return Decision()
        if elapsed_s > self._timeout_s:
            return Decision(abort=f"nova's completion timeout ({self._timeout_s:.0f} s) passed")
        if sample.status is not QemuMigrationStatus.ACTIVE:
            return Decision()
        # the last step whose time has passed; step 0 (time 0) applies on the first active poll
        due = [ms for t, ms in self._steps if elapsed_s > t] or [self._steps[0][1]]
        if due[-1] == self._current:
            return Decision()
        self._current = due[-1]
        return Decision(params={"downtime-limit": due[-1]})


def xbzrle_cache_bytes(memory_mib: int) -> int:
    """Proxmox's xbzrle cache: a tenth of the RAM, rounded up to a power of two."""
    tenth = memory_mib * MIB // 10
    size = 1
    while size < tenth:
        size <<= 1
    return size


class Proxmox:
    """Proxmox VE's qemu-server: auto-converge and xbzrle, 16 GiB/s, 100 ms downtime doubled on every
    sixth poll where the remaining RAM grew (or was zero); polls every 1 s, then every 100 ms once
    less than one pass's worth remains; never gives up on time."""

    name = "proxmox"
    label = "Proxmox VE (emulated)"
    source = (
        "proxmox/qemu-server src/PVE/QemuMigrate.pm (phase2, increase_migrate_downtime), "
        "src/PVE/QemuMigrate/Helpers.pm (set_migration_caps), src/PVE/QemuServer.pm "
        "(migrate_downtime 0.1, migrate_speed 0)"
    )

    def __init__(self) -> None:
        self._downtime_ms = 100
        self._counter = 0
        self._last_transferred = -1
        self._last_remaining: int | None = None
        self._fast = False

    def start(self, memory_mib: int) -> Start:
        self._downtime_ms, self._counter, self._last_transferred = 100, 0, -1
        self._last_remaining, self._fast = None, False
        return Start(
            caps={"auto-converge": True, "xbzrle": True},
            params={
                "max-bandwidth": PROXMOX_UNLIMITED_BPS,
                "downtime-limit": self._downtime_ms,
                "xbzrle-cache-size": xbzrle_cache_bytes(memory_mib),
            },
            poll_s=1.0,
            target_paused=True,
        )

    def step(self, elapsed_s: float, sample: MigrationSample) -> Decision:
        if sample.status is not QemuMigrationStatus.ACTIVE:
            return Decision()
        out: dict[str, Any] = {}
        poll: float | None = None
        passes = max(1, sample.dirty_sync_count)
        if not self._fast and sample.remaining_bytes < sample.transferred_bytes / passes:
            self._fast, poll = True, 0.1
        if sample.transferred_bytes != self._last_transferred:
            self._last_transferred = sample.transferred_bytes
            last = self._last_remaining
            if (last is not None and sample.remaining_bytes > last) or sample.remaining_bytes == 0:
                self._counter += 1
            self._last_remaining = sample.remaining_bytes
            if self._counter > 5:
                self._counter = 0
                self._downtime_ms = min(2 * self._downtime_ms, PROXMOX_DOWNTIME_MAX_MS)
                out["downtime-limit"] = self._downtime_ms
        return Decision(params=out, poll_s=poll)


def emulated_peers() -> list[Policy]:
    """The peers driven through QMP, in the order a scenario runs them."""
    return [QemuDefaults(), Nova(), Proxmox()]
