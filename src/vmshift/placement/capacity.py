"""Facts about a host's capacity that every placement decision and every migration check share."""

QEMU_OVERHEAD_MIB = 64  # memory a QEMU process needs beyond the guest's RAM
DEFAULT_MIGRATION_LIMIT = 4  # concurrent migrations per host; a migration counts on both of its hosts


def committed_mib(memory_mib: int) -> int:
    """What a VM of ``memory_mib`` commits on its host."""
    return memory_mib + QEMU_OVERHEAD_MIB
