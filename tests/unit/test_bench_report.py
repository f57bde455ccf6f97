"""The benchmark report (bench/suite/report.py) from a hand-made latest.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.suite import report


def side(
    converged: bool, total: int | None, downtime: int | None, gap: float, **extra: Any
) -> dict[str, Any]:
    return {
        "converged": converged,
        "total_ms": total,
        "downtime_ms": downtime,
        "max_gap_ms": gap,
        "tcp_kept": True,
        "bytes_sent": 2 * 10**9,
        "guest": {"verified": True},
        **extra,
    }


def doc() -> dict[str, Any]:
    heavy = {
        "name": "dirty-max",
        "title": "flat out",
        "link": "1gbit",
        "limit_ms": 5000,
        "scenario": {"memory_mib": 1024},
        "physical_limit": {"bytes": 600 * 2**20, "link_bytes_per_s": 125_000_000, "rate_from": "tc"},
        "results": {
            "vmshift": side(
                True, 12_000, 300, 800.0, predicted_total_ms=13_000, predicted_downtime_ms=310, slowdown=0.4
            ),
            "qemu-defaults": side(
                False, None, None, 500.0, abort="not converged within 40 s", label="QEMU defaults"
            ),
        },
    }
    light = {
        "name": "idle-1g",
        "title": "idle",
        "link": "1gbit",
        "limit_ms": 900,
        "scenario": {"memory_mib": 1024},
        "physical_limit": {},
        "results": {
            "vmshift": side(
                True,
                1000,
                15,
                150.0,
                predicted_total_ms=1100,
                predicted_downtime_ms=30,
                guest={"verified": False, "memtest": {"mismatches": 3}},
            ),
            "nova": side(True, 990, 40, 90.0, label="OpenStack nova (emulated)"),
        },
    }
    return {
        "started_at": "2026-12-01T12:00:00+00:00",
        "duration_s": 60,
        "machine": {"commit": "abc"},
        "libvirt": {"available": False, "why": "no daemon"},
        "scenarios": [heavy, light],
    }


def test_targets_say_what_is_met_and_missed_with_numbers() -> None:
    lines = report.targets(doc())
    assert lines[0].startswith("- **Converges wherever a peer does") and "met." in lines[0]
    heavy = next(line for line in lines if line.startswith("- dirty-max"))
    assert "2.40× the limit (target ≤ 1.5×: missed)" in heavy
    assert "1.40×" in heavy  # 12 s against 1 GiB over 125 MB/s = 8.6 s
    assert "longest UDP gap 800 ms (target ≤ 1000 ms: met)" in heavy
    assert "predicted total +8% (within 20%)" in heavy
    light = next(line for line in lines if line.startswith("- idle-1g"))
    assert "gap 150 ms (target ≤ 100 ms: missed)" in light
    assert "predicted downtime 30 vs 15 ms (+100%, outside 20%)" in light


def test_a_peer_that_converges_where_vmshift_does_not_is_a_missed_target() -> None:
    d = doc()
    d["scenarios"][1]["results"]["vmshift"] = side(False, None, None, 0.0, status="failed")
    assert "missed in idle-1g (converged: nova)" in report.targets(d)[0]


def test_the_markdown_shows_every_side_and_flags_a_damaged_guest(tmp_path: Path) -> None:
    md = report.markdown(doc(), plots=True)
    assert "libvirt: not run (no daemon)." in md
    assert "| QEMU defaults | not converged within 40 s | – |" in md
    assert "**{'mismatches': 3}**" in md  # the guest check failed: shown, not hidden
    assert "![total time](latest-total.png)" in md
    report.plots(doc(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest-gap.png",
        "latest-prediction.png",
        "latest-total.png",
    ]
