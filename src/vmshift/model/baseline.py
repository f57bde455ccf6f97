"""Cluster CPU baseline (EVC-style) and machine-type pinning: pure policy, no I/O.

QEMU's x86 CPU model names have no "release date", so "newest" is defined here by a table of
generations per vendor family (oldest first), then by the model version (``-vN``). Unversioned
aliases (``EPYC``, ``Haswell-noTSX``) rank below every versioned name of their generation because
their meaning depends on the machine type; a pinned ``-vN`` name stays the same across hosts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from vmshift.errors import CapacityError, InvalidInputError
from vmshift.model.host import CpuModelInfo


class CpuFamily(StrEnum):
    INTEL = "GenuineIntel"
    AMD = "AuthenticAMD"
    HYGON = "HygonGenuine"
    GENERIC = "generic"


# Generations oldest → newest within each vendor family.
_GENERATIONS: dict[CpuFamily, tuple[str, ...]] = {
    CpuFamily.GENERIC: ("486", "pentium", "pentium2", "pentium3", "qemu32", "kvm32", "qemu64", "kvm64"),
    CpuFamily.INTEL: (
        "coreduo",
        "n270",
        "core2duo",
        "Conroe",
        "Penryn",
        "Nehalem",
        "Westmere",
        "SandyBridge",
        "IvyBridge",
        "Haswell",
        "Broadwell",
        "Skylake-Client",
        "Skylake-Server",
        "KnightsMill",
        "Cascadelake-Server",
        "Cooperlake",
        "Icelake-Server",
        "Denverton",
        "Snowridge",
        "SapphireRapids",
        "GraniteRapids",
        "SierraForest",
        "ClearwaterForest",
    ),
    CpuFamily.AMD: (
        "athlon",
        "phenom",
        "Opteron_G1",
        "Opteron_G2",
        "Opteron_G3",
        "Opteron_G4",
        "Opteron_G5",
        "EPYC",
        "EPYC-Rome",
        "EPYC-Milan",
        "EPYC-Genoa",
        "EPYC-Turin",
    ),
    CpuFamily.HYGON: ("Dhyana",),
}
# Models that are not a stable, migratable baseline.
NOT_A_BASELINE = frozenset({"host", "max", "base"})
_VERSION_RE = re.compile(r"^(?P<base>.+?)-v(?P<ver>\d+)$")
_ALIAS_SUFFIXES = ("-noTSX-IBRS", "-noTSX", "-IBRS", "-IBPB")


@dataclass(frozen=True, order=True)
class CpuModelRank:
    """Sort key: same-vendor beats generic beats foreign; then generation; then version."""

    vendor_match: int
    generation: int
    version: int


def parse_cpu_model(name: str) -> tuple[CpuFamily | None, int, int]:
    """Return (family, generation index, version); version 0 for an unversioned alias."""
    base, version = name, 0
    m = _VERSION_RE.match(name)
    if m:
        base, version = m.group("base"), int(m.group("ver"))
    else:
        for suffix in _ALIAS_SUFFIXES:
            if base.endswith(suffix):
                base = base[: -len(suffix)]
                break
    for family, generations in _GENERATIONS.items():
        if base in generations:
            return family, generations.index(base) + 1, version
    return None, 0, version


def rank_cpu_model(name: str, host_vendor: str | None = None) -> CpuModelRank:
    family, generation, version = parse_cpu_model(name)
    if family is None or family is CpuFamily.GENERIC or host_vendor is None:
        vendor_match = 1
    else:
        vendor_match = 2 if family.value == host_vendor else 0
    return CpuModelRank(vendor_match, generation, version)


def runnable_everywhere(hosts_models: Sequence[Iterable[CpuModelInfo]]) -> set[str]:
    """CPU model names that every host can run without unavailable features."""
    common: set[str] | None = None
    for models in hosts_models:
        names = {m.name for m in models if m.runnable}
        common = names if common is None else common & names
    return (common or set()) - NOT_A_BASELINE


def choose_baseline(hosts_models: Sequence[Iterable[CpuModelInfo]], vendors: Iterable[str] = ()) -> str:
    """The newest CPU model every given host runs; raise CapacityError if there is none."""
    if not hosts_models:
        raise InvalidInputError(
            "No connected host to compute a CPU baseline from.",
            hint="Add a host to the cluster or wait until one is connected.",
        )
    candidates = runnable_everywhere(hosts_models)
    if not candidates:
        raise CapacityError(
            "The hosts of this cluster share no runnable CPU model.",
            hint="Check the hosts' QEMU versions and accelerators.",
        )
    vendor_set = set(vendors)
    vendor = vendor_set.pop() if len(vendor_set) == 1 else None
    return max(candidates, key=lambda n: (rank_cpu_model(n, vendor), n))


_MACHINE_ALIASES = {"pc": "pc-i440fx", "q35": "pc-q35"}
_MACHINE_VERSION_RE = re.compile(r"^(?P<family>pc-(?:i440fx|q35))-(?P<ver>\d+(?:\.\d+)*)$")


def _machine_version(name: str) -> tuple[int, ...]:
    m = _MACHINE_VERSION_RE.match(name)
    return tuple(int(p) for p in m.group("ver").split(".")) if m else ()


def resolve_machine_type(requested: str | None, available: Sequence[str], default: str) -> str:
    """Pin a machine type: an alias like ``pc``/``q35`` becomes the newest versioned type of its family.

    ``requested`` None means the host default. A concrete name must be in ``available`` (when the
    host reported a list at all).
    """
    wanted = requested or default or "q35"
    family = _MACHINE_ALIASES.get(wanted)
    if family is not None:
        versions = [m for m in available if (mm := _MACHINE_VERSION_RE.match(m)) and mm["family"] == family]
        if versions:
            return max(versions, key=_machine_version)
        if not available:
            return wanted
        raise InvalidInputError(
            f"The host has no versioned machine type for alias {wanted!r}.",
            hint=f"Use one of: {', '.join(sorted(available)[:12])}.",
        )
    if available and wanted not in available:
        raise InvalidInputError(
            f"Machine type {wanted!r} is not supported by the host.",
            hint=f"Use one of: {', '.join(sorted(available)[:12])}.",
        )
    return wanted
