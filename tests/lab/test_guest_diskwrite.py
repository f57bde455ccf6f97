"""The lab guest's disk writer (vmshift.diskwrite) writes hard, proves every chunk it wrote, and says so.

The first tests boot the image under plain QEMU (TCG, user networking, as test_guest_image.py does):
a flat-out writer on the second disk, verified while it runs, across a pause and across a power cut
with one chunk damaged offline; the rate and device options; a missing device. The last ones use
the session lab: `vmshift lab check` shows the writer, the verify probe proves it, also after a power
cycle through the server.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.helpers import LabHandle, guest_check, vmshift, vmshift_json
from tests.lab.helpers import wait_for as lab_wait_for
from tests.lab.test_guest_image import Guest, new_disk, wait_for
from vmshift.lab.image import kernel_args
from vmshift.lab.lab import run_probe
from vmshift.lab.layout import load_record
from vmshift.lab.probe import verify_ok

pytestmark = pytest.mark.lab

MIB = 1024 * 1024
FLAT_OUT = kernel_args(ip="10.0.2.15/24", disklog=True) + " vmshift.diskwrite=0"


@pytest.fixture
def guests() -> Iterator[list[Guest]]:
    started: list[Guest] = []
    yield started
    for guest in started:
        guest.kill()


def boot(guests: list[Guest], image: Path, disks: list[Path], workdir: Path, args: str) -> Guest:
    workdir.mkdir(exist_ok=True)
    guest = Guest(image, disks, workdir, args)
    guests.append(guest)
    guest.start()
    guest.wait_ready()
    return guest


def writing(guest: Guest) -> dict[str, Any]:
    """The status once the writer finished its boot scan and made a chunk durable."""

    def ready() -> dict[str, Any] | None:
        s = guest.status()
        return s if s["diskwrite"]["scanned"] and s["diskwrite"]["durable_seq"] > 0 else None

    return dict(wait_for("the disk writer's boot scan and a first durable chunk", ready, timeout=60))


def measured_mibps(guest: Guest, seconds: float = 3.0) -> float:
    """bytes_written over at least `seconds` of guest uptime."""
    first = guest.status()
    last = wait_for(f"{seconds} s of guest uptime",
                    lambda: s if (s := guest.status())["uptime_s"] >= first["uptime_s"] + seconds else None,
                    timeout=60)
    written = last["diskwrite"]["bytes_written"] - first["diskwrite"]["bytes_written"]
    return float(written / MIB / (last["uptime_s"] - first["uptime_s"]))


def assert_ring_intact(ring: dict[str, Any], chunks: int | None = None) -> None:
    assert ring["error"] is None and ring["bad"] == 0 and ring["missing"] == 0 and ring["corrupt"] == 0, ring
    assert ring["checked"] == ring["to_seq"] - ring["from_seq"] + 1, ring
    if chunks is not None:
        assert ring["checked"] == min(ring["to_seq"], chunks), ring


@pytest.mark.timeout(400)
def test_flat_out_writer_verifies_across_pause_and_power_cut(
    image: Path, guests: list[Guest], tmp_path: Path
) -> None:
    disks = [new_disk(tmp_path / "log.qcow2"), new_disk(tmp_path / "data.qcow2", "256M")]
    guest = boot(guests, image, disks, tmp_path / "boot1", FLAT_OUT)
    assert "diskwrite=0" in guest.wait_ready()
    dw = writing(guest)["diskwrite"]
    assert dw["device"] == "/dev/vdb" and dw["rate_mibps"] == 0 and dw["chunk_kib"] == 1024
    assert dw["chunks"] == 256 and dw["error"] is None and dw["errors"] == 0
    assert dw["boot_scan"]["checked"] == 0 and dw["boot_scan"]["bad"] == 0, "a fresh disk holds no chunks"

    rate = measured_mibps(guest)
    print(f"\nflat-out guest write rate: {rate:.0f} MiB/s (1 MiB O_DIRECT chunks, fdatasync each)")
    assert rate > 50, f"the flat-out writer managed only {rate:.1f} MiB/s"
    assert guest.status()["diskwrite"]["mibps"] > 0

    before = guest.status()
    verified = guest.verify()
    assert_ring_intact(verified["diskwrite"], chunks=256)
    assert verified["diskwrite"]["to_seq"] >= before["diskwrite"]["durable_seq"]
    assert_ring_intact(verified["disklog"])
    assert verified["disklog"]["to_seq"] >= before["disklog"]["durable_seq"] > 0
    lat = before["disklog"]["latency"]
    assert lat["window_s"] == 10 and lat["samples"] > 0, lat
    assert 0 < lat["p99_ms"] <= lat["max_ms"] <= lat["max_boot_ms"], lat

    # Pause and resume: the writer carries on where it was, and the ring still proves itself.
    guest.qmp("stop")
    guest.qmp("cont")
    paused_at = guest.status()["diskwrite"]["durable_seq"]
    wait_for("durable chunks after cont",
             lambda: guest.status()["diskwrite"]["durable_seq"] > paused_at + 256, timeout=60)
    after_pause = guest.verify()
    assert_ring_intact(after_pause["diskwrite"], chunks=256)
    assert_ring_intact(after_pause["disklog"])

    # A power cut, then one chunk's header damaged offline: the next boot scan finds every other
    # chunk of the last ring intact (the one in flight at the cut at most torn) and that one bad.
    before = guest.status()
    guest.kill()
    damaged_slot = 7
    damage = f"write -q -P 0x55 {damaged_slot * MIB} 4096"
    subprocess.run(["qemu-io", "-f", "qcow2", str(disks[1]), "-c", damage], check=True, capture_output=True)
    guest = boot(guests, image, disks, tmp_path / "boot2", FLAT_OUT)
    dw = writing(guest)["diskwrite"]
    scan = dw["boot_scan"]
    assert scan["corrupt"] == 1 and scan["missing"] == 0 and scan["torn"] <= 1, scan
    assert scan["checked"] + scan["torn"] == 255, scan
    assert scan["to_seq"] >= before["diskwrite"]["durable_seq"], (scan, before["diskwrite"])
    assert dw["first_seq"] == scan["to_seq"] + 1
    log = guest.status()["disklog"]
    assert log["corrupt_at_boot"] == 0 and log["records_verified_at_boot"] >= before["disklog"]["durable_seq"]
    # Once the writer went round the ring, the damaged slot holds a good chunk again.
    wait_for("a full ring written this boot",
             lambda: guest.status()["diskwrite"]["durable_seq"] >= dw["first_seq"] + 256, timeout=60)
    again = guest.verify()
    assert_ring_intact(again["diskwrite"], chunks=256)
    assert_ring_intact(again["disklog"])


@pytest.mark.timeout(300)
def test_paced_writer_on_a_named_device(image: Path, guests: list[Guest], tmp_path: Path) -> None:
    guest = boot(guests, image, [new_disk(tmp_path / "d0.qcow2")], tmp_path / "vm",
                 kernel_args(ip="10.0.2.15/24") + " vmshift.diskwrite=16,/dev/vda")
    dw = writing(guest)["diskwrite"]
    assert dw["device"] == "/dev/vda" and dw["rate_mibps"] == 16 and dw["chunks"] == 64
    rate = measured_mibps(guest, seconds=4.0)
    assert 8 <= rate <= 18, f"paced at 16 MiB/s, measured {rate:.1f} MiB/s"
    verified = guest.verify()
    assert verified["disklog"] is None
    assert_ring_intact(verified["diskwrite"], chunks=64)


@pytest.mark.timeout(300)
def test_missing_device_is_reported_not_fatal(image: Path, guests: list[Guest], tmp_path: Path) -> None:
    args = kernel_args(ip="10.0.2.15/24") + " vmshift.disklog=1,100 vmshift.diskwrite=0"
    guest = boot(guests, image, [new_disk(tmp_path / "d0.qcow2")], tmp_path / "vm", args)
    status = wait_for("the writer to give up on /dev/vdb",
                      lambda: s if (s := guest.status())["diskwrite"]["scanned"] else None, timeout=60)
    dw = status["diskwrite"]
    assert dw["enabled"] and dw["device"] == "/dev/vdb" and dw["durable_seq"] == 0
    assert "/dev/vdb" in dw["error"], dw
    assert "no block device /dev/vdb" in guest.serial_text()
    # The rest of the daemon carries on: the disk log writes (at 100 records/s), verify answers for both.
    log = wait_for("250 disk log records",
                   lambda: s if (s := guest.status()["disklog"])["durable_seq"] > 250 else None, timeout=60)
    assert log["latency"]["samples"] > 200, log  # 20 records/s would give at most 200 in 10 s
    verified = guest.verify()
    assert_ring_intact(verified["disklog"])
    assert "/dev/vdb" in verified["diskwrite"]["error"] and verified["diskwrite"]["checked"] == 0


# ---------------------------------------------------------------- in the lab, through the server


@pytest.fixture(scope="module")
def writer_vm(lab: LabHandle) -> Iterator[dict[str, Any]]:
    vm = dict(vmshift_json(
        lab, "vm", "create", "dw-1", "--host", "host-1", "--cpus", "1", "--memory", "192",
        "--datastore", "shared-1", "--network", "VM Network", "--disk", "64M", "--disk", "128M",
        "--image", "lab-guest", "--kernel-args", "vmshift.disklog=1 vmshift.diskwrite=0", "--start",
    ))
    yield vm
    vmshift(lab, "vm", "stop", "dw-1", check=False)
    vmshift(lab, "vm", "delete", "dw-1", check=False)


def lab_verify(lab: LabHandle, ip: str) -> dict[str, Any]:
    rec = load_record(lab.name)
    assert rec is not None
    return run_probe(rec, ["verify", ip], timeout=150)


def lab_writing(lab: LabHandle, vm: str, after_seq: int = 0) -> dict[str, Any]:
    return lab_wait_for(
        f"{vm}'s disk writer to make chunks durable",
        lambda: c if ((c := guest_check(lab, vm))["diskwrite"] or {}).get("durable_seq", 0) > after_seq + 64
        else None,
        timeout=120,
    )


@pytest.mark.timeout(600)
def test_lab_check_shows_the_writer_and_verify_proves_it(lab: LabHandle, writer_vm: dict[str, Any]) -> None:
    checked = lab_writing(lab, "dw-1")
    dw = checked["diskwrite"]
    assert dw["device"] == "/dev/vdb" and dw["chunks"] == 128 and dw["errors"] == 0 and dw["error"] is None
    assert dw["mibps"] > 0, dw
    print(f"\nlab guest flat-out write rate (last second): {dw['mibps']:.0f} MiB/s")
    answer = lab_verify(lab, writer_vm["ip"])
    assert verify_ok(answer), answer
    assert_ring_intact(answer["diskwrite"], chunks=128)
    assert answer["diskwrite"]["to_seq"] >= dw["durable_seq"]

    # Power cycle through the server: the next boot finds the last ring intact and continues above it.
    durable = guest_check(lab, "dw-1")["diskwrite"]["durable_seq"]
    vmshift(lab, "vm", "stop", "dw-1")
    vmshift(lab, "vm", "start", "dw-1")
    rebooted = lab_writing(lab, "dw-1")["diskwrite"]
    scan = rebooted["boot_scan"]
    assert scan["bad"] == 0 and scan["to_seq"] >= durable and scan["torn"] <= 1, scan
    assert scan["checked"] + scan["torn"] == 128, scan
    answer = lab_verify(lab, writer_vm["ip"])
    assert verify_ok(answer), answer


@pytest.mark.timeout(600)
def test_lab_writer_verifies_after_a_live_migration(lab: LabHandle, writer_vm: dict[str, Any]) -> None:
    """Shared storage, the guest writing flat out through the switchover: the ring still proves itself."""
    before = lab_writing(lab, "dw-1")["diskwrite"]
    host = vmshift_json(lab, "vm", "show", "dw-1")["host"]
    target = "host-2" if host == "host-1" else "host-1"
    m = dict(vmshift_json(lab, "vm", "migrate", "dw-1", "--host", target, timeout=600))
    assert m["status"] == "completed", m.get("error")
    after = lab_writing(lab, "dw-1", after_seq=before["durable_seq"])["diskwrite"]
    assert after["errors"] == 0 and after["first_seq"] == before["first_seq"], "the guest rebooted or failed"
    answer = lab_verify(lab, writer_vm["ip"])
    assert verify_ok(answer), answer
    assert_ring_intact(answer["diskwrite"], chunks=128)
    assert answer["diskwrite"]["to_seq"] > before["durable_seq"]
    assert answer["disklog"]["to_seq"] > 0
