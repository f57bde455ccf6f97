"""The peers' migration policies of the benchmark (bench/suite/policies.py), on made-up samples."""

from __future__ import annotations

from bench.suite.policies import (
    MIB,
    LibvirtDefaults,
    Nova,
    Proxmox,
    QemuDefaults,
    nova_data_gb,
    nova_downtime_steps,
    xbzrle_cache_bytes,
)

from vmshift.migration.samples import MigrationSample, QemuMigrationStatus

A = QemuMigrationStatus.ACTIVE


def sample(
    t: float, remaining: int, transferred: int = 0, rounds: int = 1, status: QemuMigrationStatus = A
) -> MigrationSample:
    return MigrationSample(
        time_s=t,
        status=status,
        remaining_bytes=remaining,
        transferred_bytes=transferred,
        dirty_sync_count=rounds,
    )


def test_nova_steps_rise_evenly_from_a_tenth_to_the_full_downtime() -> None:
    steps = nova_downtime_steps(2.0)
    assert len(steps) == 11
    assert steps[0] == (0, 50) and steps[1] == (150, 95) and steps[-1] == (1500, 500)
    assert nova_data_gb(1024) == 2.0 and nova_data_gb(4096) == 4.0


def test_nova_sets_its_first_step_at_once_and_the_next_only_when_due() -> None:
    nova = Nova()
    start = nova.start(1024)
    assert start.params["max-bandwidth"] > 1 << 50 and start.caps["pause-before-switchover"]
    assert nova.step(0.5, sample(0.5, 900 * MIB)).params == {"downtime-limit": 50}
    assert nova.step(1.0, sample(1.0, 800 * MIB)).params == {}
    assert nova.step(150.5, sample(150.5, 800 * MIB)).params == {"downtime-limit": 95}
    assert nova.step(151.0, sample(151.0, 800 * MIB)).abort is None


def test_nova_aborts_after_800_s_per_gib_but_never_in_postcopy() -> None:
    nova = Nova()
    nova.start(1024)  # counted as 2 GiB: 1600 s
    assert nova.step(1599.0, sample(1599.0, MIB)).abort is None
    assert nova.step(1601.0, sample(1601.0, MIB, status=QemuMigrationStatus.POSTCOPY_ACTIVE)).abort is None
    assert "1600" in (nova.step(1601.0, sample(1601.0, MIB)).abort or "")


def test_proxmox_doubles_the_downtime_on_every_sixth_poll_where_the_rest_grew() -> None:
    px = Proxmox()
    start = px.start(1024)
    assert start.params["downtime-limit"] == 100 and start.caps == {"auto-converge": True, "xbzrle": True}
    assert start.params["xbzrle-cache-size"] == 128 * MIB
    sent, doubled = 0, []
    remaining = [500, 400, 450, 300, 350, 360, 200, 250, 260, 270]  # MiB; grows on 7 polls
    for i, rem in enumerate(remaining):
        sent += 100 * MIB
        d = px.step(i + 1.0, sample(i + 1.0, rem * MIB, transferred=sent, rounds=i + 1))
        if d.params:
            doubled.append((i, d.params["downtime-limit"]))
    # rises at polls 2, 4, 5, 7, 8, 9 -> the sixth rise (poll 9) doubles
    assert doubled == [(9, 200)]


def test_proxmox_counts_nothing_when_nothing_was_sent_and_polls_fast_near_the_end() -> None:
    px = Proxmox()
    px.start(2048)
    for i in range(10):  # transferred never changes: the downtime logic is skipped
        assert (
            px.step(float(i), sample(float(i), (100 + i) * MIB, transferred=5 * MIB, rounds=1)).params == {}
        )
    fast = px.step(11.0, sample(11.0, 10 * MIB, transferred=900 * MIB, rounds=3))
    assert fast.poll_s == 0.1
    assert xbzrle_cache_bytes(2048) == 256 * MIB and xbzrle_cache_bytes(1000) == 128 * MIB


def test_qemu_and_libvirt_defaults_never_touch_a_running_migration() -> None:
    for policy in (QemuDefaults(), LibvirtDefaults()):
        policy.start(1024)
        for t in (0.5, 100.0, 10_000.0):
            d = policy.step(t, sample(t, 500 * MIB, transferred=int(t) * MIB))
            assert d.params == {} and d.abort is None
    assert QemuDefaults().start(1024).params == {}
    assert LibvirtDefaults().start(1024).target_paused
