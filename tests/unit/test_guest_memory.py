"""Sampling the share of zero pages of a process's memory (vmshift.agent.guest_memory)."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest

from vmshift.agent.guest_memory import PAGE, ram_mapping, sample_zero_fraction, zero_fraction_at


def test_every_page_is_read_when_there_are_fewer_than_the_samples() -> None:
    data = {3: b"x" * PAGE, 7: b"y" * PAGE}
    seen: list[int] = []

    def read(n: int) -> bytes:
        seen.append(n)
        return data.get(n, bytes(PAGE))

    assert sample_zero_fraction(read, 10, samples=100) == pytest.approx(0.8)
    assert sorted(seen) == list(range(10))


def test_samples_spread_over_the_whole_mapping() -> None:
    # the first quarter holds data: a sampler that only looked at the start would say 0% zeros
    frac = sample_zero_fraction(lambda n: b"d" * PAGE if n < 25_000 else bytes(PAGE), 100_000, samples=1000)
    assert frac == pytest.approx(0.75, abs=0.01)
    with pytest.raises(ValueError):
        sample_zero_fraction(lambda n: bytes(PAGE), 0)


def test_reads_a_real_mapping_through_proc_mem() -> None:
    pages = 1000
    region = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        start = ctypes.addressof(ctypes.c_char.from_buffer(region))
        for n in range(0, pages, 4):  # a quarter of the pages hold data, the rest was never touched
            region[n * PAGE] = 1
        assert zero_fraction_at(os.getpid(), start, pages * PAGE, samples=pages) == pytest.approx(0.75)
        assert ram_mapping(os.getpid(), 1 << 50) is None  # no mapping of that size
    finally:
        region.close()
