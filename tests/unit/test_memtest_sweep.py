"""When the lab's memtest has verified every page since an earlier answer (lab.memtest_swept_since)."""

from __future__ import annotations

from vmshift.lab.lab import memtest_swept_since

PAGES_16M = 16 * 256  # 4 KiB pages


def answer(pages: int, passes: int, threads: int = 1, mismatches: int = 0) -> dict[str, int]:
    return {"size_mib": 16, "threads": threads, "pages": pages, "passes": passes, "mismatches": mismatches}


def test_one_thread_needs_as_many_checks_as_pages_from_wherever_it_was() -> None:
    start = answer(pages=10 * PAGES_16M + 1234, passes=10)  # mid-sweep
    assert not memtest_swept_since(start, answer(pages=11 * PAGES_16M + 1233, passes=11))
    assert memtest_swept_since(start, answer(pages=11 * PAGES_16M + 1234, passes=11)), "one full cycle"


def test_several_threads_need_two_more_passes() -> None:
    start = answer(pages=4 * PAGES_16M, passes=4, threads=4)
    assert not memtest_swept_since(start, answer(pages=6 * PAGES_16M, passes=5, threads=4)), \
        "the pages total says nothing of each slice"
    assert memtest_swept_since(start, answer(pages=6 * PAGES_16M, passes=6, threads=4))


def test_a_mismatch_ends_the_wait() -> None:
    assert memtest_swept_since(answer(0, 0), answer(5, 0, mismatches=1))
