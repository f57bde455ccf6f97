"""Pure policy: CPU baseline choice, machine-type pinning, MAC generation, IP pool allocation."""

from __future__ import annotations

import random

import pytest

from vmshift.errors import CapacityError, InvalidInputError
from vmshift.model.addressing import allocate_ip, check_pool, generate_mac, ip_kernel_arg
from vmshift.model.baseline import choose_baseline, parse_cpu_model, rank_cpu_model, resolve_machine_type
from vmshift.model.host import CpuModelInfo


def models(*runnable: str, blocked: tuple[str, ...] = ()) -> list[CpuModelInfo]:
    return [CpuModelInfo(name=n) for n in runnable] + [
        CpuModelInfo(name=n, unavailable_features=["avx512f"]) for n in blocked
    ]


def test_parse_cpu_model_names() -> None:
    assert parse_cpu_model("Skylake-Server-v4")[1:] == (parse_cpu_model("Skylake-Server")[1], 4)
    fam, gen_haswell, ver = parse_cpu_model("Haswell-noTSX-IBRS")
    assert fam is not None and fam.value == "GenuineIntel" and ver == 0
    assert parse_cpu_model("Broadwell-v1")[1] > gen_haswell
    assert parse_cpu_model("EPYC-Genoa-v1")[1] > parse_cpu_model("EPYC-Rome-v4")[1]
    assert parse_cpu_model("mystery-cpu") == (None, 0, 0)


def test_baseline_is_newest_model_every_host_runs() -> None:
    h1 = models("qemu64", "Nehalem-v1", "Haswell-v1", "Haswell-v4", "Skylake-Server-v1")
    h2 = models("qemu64", "Nehalem-v1", "Haswell-v1", "Haswell-v4", blocked=("Skylake-Server-v1",))
    assert choose_baseline([h1]) == "Skylake-Server-v1"
    assert choose_baseline([h1, h2]) == "Haswell-v4"  # v4 is newer than v1 of the same generation


def test_baseline_never_picks_host_or_max_and_prefers_pinned_versions() -> None:
    h = models("host", "max", "base", "qemu64", "EPYC", "EPYC-v2")
    assert choose_baseline([h]) == "EPYC-v2"
    assert choose_baseline([models("max", "qemu64")]) == "qemu64"


def test_baseline_prefers_the_hosts_vendor() -> None:
    h = models("qemu64", "Opteron_G2-v1", "Skylake-Client-v1")
    assert choose_baseline([h], ["AuthenticAMD"]) == "Opteron_G2-v1"
    assert choose_baseline([h], ["GenuineIntel"]) == "Skylake-Client-v1"
    # a mixed-vendor cluster: no vendor preference, newest generation within its family wins deterministically
    assert choose_baseline([h], ["GenuineIntel", "AuthenticAMD"]) in {"Skylake-Client-v1", "Opteron_G2-v1"}
    assert rank_cpu_model("qemu64", "AuthenticAMD") > rank_cpu_model("Skylake-Client-v1", "AuthenticAMD")


def test_baseline_errors() -> None:
    with pytest.raises(CapacityError, match="share no runnable CPU model"):
        choose_baseline([models("Haswell-v1"), models("EPYC-v1")])
    with pytest.raises(InvalidInputError):
        choose_baseline([])


def test_machine_type_pinning() -> None:
    avail = ["pc-i440fx-9.2", "pc-i440fx-10.0", "pc-q35-9.2", "pc-q35-10.0", "pc-q35-10.0.1", "microvm"]
    assert resolve_machine_type(None, avail, "q35") == "pc-q35-10.0.1"
    assert resolve_machine_type("pc", avail, "q35") == "pc-i440fx-10.0"
    assert resolve_machine_type(None, avail, "pc-q35-9.2") == "pc-q35-9.2"
    assert resolve_machine_type("microvm", avail, "q35") == "microvm"
    with pytest.raises(InvalidInputError, match="not supported"):
        resolve_machine_type("pc-q35-2.0", avail, "q35")
    with pytest.raises(InvalidInputError, match="no versioned machine type"):
        resolve_machine_type("pc", ["microvm"], "q35")


def test_generate_mac_is_qemu_prefixed_and_unique() -> None:
    rng = random.Random(1)
    used: set[str] = set()
    for _ in range(2000):
        mac = generate_mac(used, rng)
        assert mac.startswith("52:54:00:") and len(mac) == 17 and mac == mac.lower()
        assert mac not in used
        used.add(mac)
    # a generator that always draws the same value cannot find a free one
    stuck = random.Random(5)
    first = generate_mac(set(), random.Random(5))
    with pytest.raises(CapacityError):
        generate_mac({first}, _Constant(stuck.getrandbits(24)), attempts=10)


class _Constant(random.Random):
    def __init__(self, value: int) -> None:
        super().__init__()
        self._value = value

    def getrandbits(self, k: int) -> int:
        return self._value


def test_ip_pool_allocation() -> None:
    assert allocate_ip("10.0.0.0/24", "10.0.0.100", "10.0.0.102", []) == "10.0.0.100"
    assert allocate_ip("10.0.0.0/24", "10.0.0.100", "10.0.0.102", ["10.0.0.100"]) == "10.0.0.101"
    assert (
        allocate_ip("10.0.0.0/24", "10.0.0.100", "10.0.0.102", ["10.0.0.100", "10.0.0.102"]) == "10.0.0.101"
    )
    with pytest.raises(CapacityError, match="no free address"):
        allocate_ip("10.0.0.0/24", "10.0.0.100", "10.0.0.101", ["10.0.0.100", "10.0.0.101"])
    assert ip_kernel_arg("10.0.0.100", "10.0.0.0/24") == "vmshift.ip=10.0.0.100/24"


@pytest.mark.parametrize(
    ("cidr", "first", "last", "text"),
    [
        ("10.0.0.0/33", "10.0.0.1", "10.0.0.2", "not a valid IPv4 network"),
        ("10.0.0.1/24", "10.0.0.1", "10.0.0.2", "not a valid IPv4 network"),
        ("10.0.0.0/24", "10.0.1.1", "10.0.0.2", "not inside"),
        ("10.0.0.0/24", "10.0.0.9", "10.0.0.2", "after last"),
        ("10.0.0.0/24", "10.0.0.0", "10.0.0.2", "network or broadcast"),
        ("10.0.0.0/24", "10.0.0.1", "10.0.0.255", "network or broadcast"),
        ("10.0.0.0/24", "x", "10.0.0.2", "not valid IPv4 addresses"),
    ],
)
def test_bad_pools(cidr: str, first: str, last: str, text: str) -> None:
    with pytest.raises(InvalidInputError, match=text):
        check_pool(cidr, first, last)
