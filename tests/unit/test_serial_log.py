"""The capped serial log: rotation keeps the two files within the cap, tails and moves keep the order."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vmshift.agent import serial_log
from vmshift.agent.serial_log import WritePlan, plan_write, split_capped
from vmshift.qemu.cmdline import VmPaths

CAP = 1000


def paths_in(folder: Path) -> VmPaths:
    folder.mkdir(parents=True, exist_ok=True)
    return VmPaths(vm_dir=folder, run_dir=folder / "run")


def sizes(p: VmPaths) -> tuple[int, int]:
    return tuple(f.stat().st_size if f.exists() else 0 for f in (p.serial_log_old, p.serial_log))  # type: ignore[return-value]


@pytest.mark.parametrize(("current", "chunk", "plan"), [
    (0, 10, WritePlan(rotate=False, keep_bytes=10)),
    (490, 10, WritePlan(rotate=False, keep_bytes=10)),  # exactly half: still fits
    (491, 10, WritePlan(rotate=True, keep_bytes=10)),
    (0, 600, WritePlan(rotate=False, keep_bytes=500)),  # a chunk larger than half keeps its tail
    (20, 600, WritePlan(rotate=True, keep_bytes=500)),
])
def test_plan_write(current: int, chunk: int, plan: WritePlan) -> None:
    assert plan_write(current, chunk, CAP) == plan


def test_split_capped_keeps_the_newest_bytes() -> None:
    data = bytes(range(256)) * 10
    older, newer = split_capped(data, CAP)
    assert older + newer == data[-CAP:]
    assert len(newer) == CAP // 2
    assert split_capped(b"abc", CAP) == (b"", b"abc")


def test_a_flood_never_passes_the_cap_and_the_newest_lines_stay(tmp_path: Path) -> None:
    p = paths_in(tmp_path / "vm")
    written = 0
    for i in range(2000):
        chunk = f"line {i}\n".encode() * (1 + i % 7)
        serial_log.append(p, chunk, CAP)
        written += len(chunk)
        old, new = sizes(p)
        assert old <= CAP // 2 and new <= CAP // 2 and old + new <= CAP
    assert written > 20 * CAP
    text = serial_log.tail(p, CAP).decode()
    assert text.endswith("line 1999\n")
    assert stat.S_IMODE(os.stat(p.serial_log).st_mode) == 0o600


def test_tail_spans_the_rotation(tmp_path: Path) -> None:
    p = paths_in(tmp_path / "vm")
    p.serial_log_old.write_bytes(b"older\n")
    p.serial_log.write_bytes(b"newer\n")
    assert serial_log.tail(p, 9) == b"er\nnewer\n"
    assert serial_log.tail(p, 100) == b"older\nnewer\n"
    assert serial_log.tail(paths_in(tmp_path / "empty"), 100) == b""


def test_merge_into_a_new_home_keeps_order_and_is_idempotent(tmp_path: Path) -> None:
    old, new = paths_in(tmp_path / "a" / "vm"), paths_in(tmp_path / "b" / "vm")
    old.serial_log_old.write_bytes(b"1\n")
    old.serial_log.write_bytes(b"2\n")
    new.serial_log.write_bytes(b"3\n")  # written at the new home after the switch
    serial_log.merge_into(old, new, CAP)
    assert serial_log.tail(new, CAP) == b"1\n2\n3\n"
    assert not old.serial_log.exists() and not old.serial_log_old.exists()
    serial_log.merge_into(old, new, CAP)
    assert serial_log.tail(new, CAP) == b"1\n2\n3\n"


def test_merge_respects_the_cap(tmp_path: Path) -> None:
    old, new = paths_in(tmp_path / "a" / "vm"), paths_in(tmp_path / "b" / "vm")
    old.serial_log_old.write_bytes(b"o" * 500)
    old.serial_log.write_bytes(b"p" * 500)
    new.serial_log.write_bytes(b"n" * 300)
    serial_log.merge_into(old, new, CAP)
    assert sum(sizes(new)) == CAP and max(sizes(new)) <= CAP // 2
    assert serial_log.tail(new, CAP).endswith(b"p" * 200 + b"n" * 300)
