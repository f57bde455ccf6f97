"""The lab's network: pure name/address allocation, and a real 2-host topology built and torn down."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.helpers import wait_for
from vmshift.errors import InvalidInputError, LabError
from vmshift.lab import lab, topology
from vmshift.lab.layout import LabLayout, free_index, validate_name

# ---------------------------------------------------------------- pure allocation


def test_addresses_follow_the_lab_index() -> None:
    lay = LabLayout("demo", 3, 2)
    assert lay.namespaces == ["vms-demo-switch", "vms-demo-host-1", "vms-demo-host-2", "vms-demo-client"]
    assert lay.root_mgmt_address == "10.213.12.1"
    assert [lay.host_mgmt_address(k) for k in lay.host_numbers] == ["10.213.12.11", "10.213.12.12"]
    assert lay.host_mig_address(2) == "10.213.13.12"
    assert lay.client_address == "10.213.14.2"
    assert (lay.vm_cidr, lay.pool_first, lay.pool_last) == (
        "10.213.14.0/24",
        "10.213.14.100",
        "10.213.14.199",
    )
    assert lay.agent_address(1) == "10.213.12.11:8101"


def test_interface_names_fit_and_root_names_differ_between_labs() -> None:
    roots = {LabLayout("a", i, 1).root_veth for i in range(64)}
    assert len(roots) == 64
    assert max(len(n) for n in roots) <= 15
    lay = LabLayout("x" * 24, 63, 9)
    assert all(
        len(lay.switch_port(k, role)) <= 15 for k in lay.host_numbers for role in ("vm", "mgmt", "mig")
    )


def test_free_index_takes_the_lowest_gap() -> None:
    assert free_index([]) == 0
    assert free_index([0, 1, 3]) == 2
    with pytest.raises(LabError):
        free_index(range(64))


@pytest.mark.parametrize("bad", ["", "Lab", "-x", "a_b", "x" * 25, "a/b"])
def test_bad_lab_names_are_refused(bad: str) -> None:
    with pytest.raises(InvalidInputError):
        validate_name(bad)


def test_bad_host_counts_are_refused() -> None:
    with pytest.raises(InvalidInputError):
        LabLayout("ok", 0, 0)
    with pytest.raises(InvalidInputError):
        LabLayout("ok", 0, 10)


def test_rates_parse_like_tc() -> None:
    assert topology.rate_bits_per_second("1gbit") == 1_000_000_000
    assert topology.rate_bits_per_second("330mbit") == 330_000_000
    assert topology.rate_bits_per_second("10mbps") == 80_000_000
    with pytest.raises(InvalidInputError):
        topology.rate_bits_per_second("fast")


# ---------------------------------------------------------------- real topology

@pytest.fixture
def needs_root() -> None:
    """A missing privilege is a failure, not a skip: CI runs these as root."""
    if os.geteuid() != 0:
        pytest.fail("The topology tests need root (network namespaces): run them as root.")


def _ns(ns: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=30)


def _ping(ns: str | None, address: str) -> bool:
    cmd = ["busybox", "ping", "-c", "1", "-W", "3", address]
    if ns is None:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    return _ns(ns, *cmd).returncode == 0


@pytest.fixture
def built() -> Iterator[LabLayout]:
    name = f"ttopo{os.getpid() % 100000}"
    rec = topology.reserve(name, 2)
    try:
        topology.build(rec.layout, migration_link_rate="200mbit")
        yield rec.layout
    finally:
        lab.down(name)


@pytest.mark.lab
@pytest.mark.usefixtures("needs_root")
def test_topology_connects_hosts_and_tears_down_completely(built: LabLayout) -> None:
    lay = built
    h1, h2 = lay.host_ns(1), lay.host_ns(2)
    # Management: host to host, and the root namespace (where the server runs) to each host.
    assert _ping(h1, lay.host_mgmt_address(2))
    assert _ping(None, lay.host_mgmt_address(1))
    assert _ping(None, lay.host_mgmt_address(2))
    # Migration network between hosts, and it is not the management network.
    assert _ping(h2, lay.host_mig_address(1))
    routes = _ns(h1, "ip", "-j", "route", "get", lay.host_mig_address(2)).stdout
    assert json.loads(routes)[0]["dev"] == "mig0"
    # VM network: give host-1's br0 an address (guests would sit there) and reach it from the client.
    br_addr = f"{lay.vm_net}.21"
    assert _ns(h1, "ip", "addr", "add", f"{br_addr}/24", "dev", "br0").returncode == 0
    assert _ping(lay.client_ns, br_addr)
    # Shaping on both ends of each migration link.
    qdisc = topology.migration_link_qdisc(lay, 1)
    assert "tbf" in qdisc and "200Mbit" in qdisc
    assert "tbf" in _ns(lay.switch_ns, "tc", "qdisc", "show", "dev", "h2-mig").stdout
    topology.set_migration_link_rate(lay, 1, None)
    assert "tbf" not in topology.migration_link_qdisc(lay, 1)
    # Unplugging host-2's migration cable cuts the migration network but not management.
    topology.set_migration_link(lay, 2, up=False)
    assert not _ping(h1, lay.host_mig_address(2))
    assert _ping(h1, lay.host_mgmt_address(2))
    topology.set_migration_link(lay, 2, up=True)
    assert _ping(h1, lay.host_mig_address(2))
    # A process living in a host namespace (as QEMU would) must be killed by down.
    sleeper = subprocess.Popen(["ip", "netns", "exec", h2, "sleep", "300"], start_new_session=True)
    try:
        # `ip netns exec` enters the namespace and then execs sleep under the same pid.
        wait_for(
            "the sleeper to enter host-2's namespace",
            lambda: sleeper.pid in topology.namespace_pids(h2),
            10,
            0.05,
        )
        assert lab.down(lay.name) == []
        assert sleeper.wait(timeout=30) is not None
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
    _assert_gone(lay)


def _assert_gone(lay: LabLayout) -> None:
    assert topology.existing_namespaces(lay) == []
    assert not Path("/sys/class/net", lay.root_veth).exists()
    assert f"vms-{lay.name}-" not in Path("/proc/mounts").read_text()
    assert not lay.lab_dir.exists()


@pytest.mark.lab
@pytest.mark.usefixtures("needs_root")
def test_down_cleans_up_after_a_partial_build() -> None:
    name = f"tpart{os.getpid() % 100000}"
    rec = topology.reserve(name, 2)
    lay = rec.layout
    try:
        # Half a topology: namespaces and one host's uplink, no root leg.
        for ns in lay.namespaces[:3]:
            topology.run(["ip", "netns", "add", ns])
        topology.run(["ip", "-n", lay.host_ns(1), "link", "add", "br0", "type", "bridge"])
        with pytest.raises(LabError, match="already exists"):
            topology.build(lay)
        assert lab.down(name) == []
        _assert_gone(lay)
        # Idempotent: a second down finds nothing and succeeds.
        assert lab.down(name) == []
    finally:
        lab.down(name)


def test_context_points_at_the_last_lab_and_is_cleared_only_by_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmshift.lab import context

    monkeypatch.setenv("VMSHIFT_CONFIG_DIR", str(tmp_path))
    assert context.load_context() is None
    path = context.save_context("http://127.0.0.1:1234", "tok", "a")
    assert path.stat().st_mode & 0o077 == 0, "the context holds a token: owner-only"
    assert context.load_context() == {"server": "http://127.0.0.1:1234", "token": "tok", "lab": "a"}
    assert not context.clear_context("b")
    assert context.load_context() is not None
    assert context.clear_context("a")
    assert context.load_context() is None


def test_host_names_and_numbers_both_work() -> None:
    from vmshift.lab.processes import host_number

    assert host_number(2) == host_number("2") == host_number("host-2") == 2
    with pytest.raises(LabError):
        host_number("vm-1")
