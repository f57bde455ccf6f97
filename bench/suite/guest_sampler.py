"""Sample the lab guest's status port until stdin closes; print the series as one JSON line.

    ip netns exec CLIENT_NS python -m bench.suite.guest_sampler IP [--every 0.25]

Runs in the lab's client namespace during a benchmark leg. Each point is (CLOCK_MONOTONIC seconds,
memtest pages, passes, mismatches); the monotonic clock is the machine's, so the runner puts the
points on the same axis as the migration. A point that fails (the guest is paused or moving) is
simply missing: the gap is part of what the series shows.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

from vmshift.lab.probe import guest_status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ip")
    ap.add_argument("--every", type=float, default=0.25)
    args = ap.parse_args(argv)
    stop = threading.Event()

    def wait_stdin() -> None:  # closing stdin is the caller's way to stop the sampler
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_stdin, daemon=True).start()
    points: list[list[float]] = []
    failures = 0
    while not stop.is_set():
        t = time.monotonic()
        try:
            mt = guest_status(args.ip, timeout=1.0).get("memtest") or {}
            points.append(
                [
                    round(t, 4),
                    float(mt.get("pages", 0)),
                    float(mt.get("passes", 0)),
                    float(mt.get("mismatches", 0)),
                ]
            )
        except (OSError, ValueError):
            failures += 1
        stop.wait(max(0.0, args.every - (time.monotonic() - t)))
    print(json.dumps({"points": points, "failures": failures}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
