"""The benchmark's scenarios: one guest, one workload, one migration link each.

memtest's RATE is in MiB of pages dirtied per second, so the ratios to the link are set by the rate:
on a 1 Gbit/s link (119 MiB/s) 30, 60, 119, 238 and 357 MiB/s are 25%, 50%, 100%, 200% and 300%.
The guest can do that: flat out (RATE 0) its memtest dirtied ~390,000 pages/s (~1.5 GiB/s) here,
and QEMU's calc-dirty-rate reported 518 MiB/s for it (FACTS.md's ~115 MiB/s was a loop writing
every byte; memtest writes a word per page). So no link is shaped below 1 Gbit/s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vmshift.lab.topology import rate_bits_per_second


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    memory_mib: int
    cpus: int
    memtest: str | None  # the guest's vmshift.memtest=SIZE_MIB,RATE_MIBPS[,THREADS]; None = idle
    link: str | None  # tc rate of the migration link; None = unshaped
    httpd: bool = False
    #: a peer still migrating after this long is cancelled and reported as not converged
    limit_s: float = 40.0

    @property
    def kernel_args(self) -> str:
        args = ["vmshift.disklog=1"]
        if self.memtest:
            args.append(f"vmshift.memtest={self.memtest}")
        if self.httpd:
            args.append("vmshift.httpd=1")
        return " ".join(args)

    @property
    def link_bytes_per_s(self) -> float | None:
        return rate_bits_per_second(self.link) / 8 if self.link else None

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "kernel_args": self.kernel_args}


G1 = "1gbit"
SCENARIOS: list[Scenario] = [
    Scenario("idle-1g", "idle 1 GiB guest, 1 Gbit/s", 1024, 1, None, G1),
    Scenario("dirty-25", "1 GiB, 128 MiB dirtied at 30 MiB/s (25% of 1 Gbit/s)", 1024, 1, "128,30", G1),
    Scenario("dirty-50", "1 GiB, 256 MiB dirtied at 60 MiB/s (50% of 1 Gbit/s)", 1024, 1, "256,60", G1),
    Scenario("dirty-100", "1 GiB, 512 MiB dirtied at 119 MiB/s (100% of 1 Gbit/s)", 1024, 1, "512,119", G1),
    Scenario("dirty-200", "1 GiB, 512 MiB dirtied at 238 MiB/s (200% of 1 Gbit/s)", 1024, 1, "512,238", G1),
    Scenario("dirty-300", "1 GiB, 512 MiB dirtied at 357 MiB/s (300% of 1 Gbit/s)", 1024, 1, "512,357", G1),
    Scenario("dirty-max", "1 GiB, 512 MiB dirtied flat out, 1 Gbit/s", 1024, 1, "512,0", G1),
    Scenario("2vcpu", "1 GiB, 2 vCPUs each dirtying 256 MiB flat out, 1 Gbit/s", 1024, 2, "512,0,2", G1),
    Scenario(
        "http", "512 MiB web server (busybox httpd) under 50 req/s, 1 Gbit/s", 512, 1, "64,20", G1, httpd=True
    ),
    Scenario("idle-1g-unshaped", "idle 1 GiB guest, unshaped link", 1024, 1, None, None),
    Scenario("dirty-max-unshaped", "1 GiB, 512 MiB dirtied flat out, unshaped link", 1024, 1, "512,0", None),
    Scenario(
        "2vcpu-unshaped", "1 GiB, 2 vCPUs both dirtying flat out, unshaped link", 1024, 2, "512,0,2", None
    ),
    Scenario(
        "http-unshaped", "512 MiB web server under 50 req/s, unshaped link", 512, 1, "64,20", None, httpd=True
    ),
]
QUICK = ("idle-1g", "dirty-50", "dirty-max")


def select(names: list[str] | None, quick: bool) -> list[Scenario]:
    wanted = names or (list(QUICK) if quick else [s.name for s in SCENARIOS])
    known = {s.name: s for s in SCENARIOS}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"Unknown scenario(s) {', '.join(unknown)}; known: {', '.join(known)}.")
    return [known[n] for n in wanted]
