"""Facts about a host's capacity that every placement decision and every migration check share."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

QEMU_OVERHEAD_MIB = 64  # memory a QEMU process needs beyond the guest's RAM
DEFAULT_MIGRATION_LIMIT = 4  # concurrent migrations per host; a migration counts on both of its hosts


def at_limit(running: Mapping[str, int], limits: Mapping[str, int], hosts: Iterable[str]) -> list[str]:
    """The hosts among ``hosts`` whose migrations (``running``) fill their limit: a migration that
    touches one waits in the queue. The one home of the concurrency rule: the checks, the queue
    and placement's lanes all ask it."""
    return [h for h in dict.fromkeys(hosts)
            if running.get(h, 0) >= limits.get(h, DEFAULT_MIGRATION_LIMIT)]


def committed_mib(memory_mib: int) -> int:
    """What a VM of ``memory_mib`` commits on its host."""
    return memory_mib + QEMU_OVERHEAD_MIB
