"""Build and tear down a lab's network: namespaces as hosts, veths and bridges, via iproute2.

Every veth is created directly between its two namespaces (`ip link add A netns X type veth peer
name B netns Y`), so only the one root-namespace leg (`vmslab{i}-mgmt`) ever lives in the root
namespace; its name holds the lab index, which keeps labs apart.
"""

from __future__ import annotations

import fcntl
import re
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from vmshift.errors import InvalidInputError, LabError
from vmshift.lab import layout as L
from vmshift.lab.layout import LabLayout, LabRecord

NETNS_DIR = Path("/run/netns")
_RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)([kmgt]?)(bit|bps)$")
_RATE_UNITS = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000, "t": 1_000_000_000_000}


def run(args: Sequence[str], *, check: bool = True, timeout: float = 30) -> str:
    """Run one command; a failure becomes a LabError naming the command and its stderr."""
    try:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LabError(f"Command '{' '.join(args)}' could not run: {e}.") from e
    if check and proc.returncode != 0:
        raise LabError(
            f"Command '{' '.join(args)}' failed (exit {proc.returncode}): {proc.stderr.strip()}",
            hint="Check that you are root and iproute2 is installed; 'vmshift lab down' cleans up.",
        )
    return proc.stdout


def ns_exists(ns: str) -> bool:
    return (NETNS_DIR / ns).exists()


def root_link_exists(ifname: str) -> bool:
    return Path("/sys/class/net", ifname).exists()


def rate_bits_per_second(rate: str) -> int:
    """Parse a tc rate such as '1gbit', '330mbit' or '100mbps' (bytes) into bits per second."""
    m = _RATE_RE.match(rate.strip().lower())
    if not m:
        raise InvalidInputError(
            f"Link rate {rate!r} is not understood.", hint="Use a tc rate such as 1gbit, 330mbit or 100mbps."
        )
    value = float(m.group(1)) * _RATE_UNITS[m.group(2)]
    bits = value * 8 if m.group(3) == "bps" else value
    if bits < 8_000:
        raise InvalidInputError(f"Link rate {rate!r} is too low.", hint="Use at least 8kbit.")
    return int(bits)


# ---------------------------------------------------------------- index reservation


@contextmanager
def _labs_lock() -> Iterator[None]:
    L.LABS_ROOT.mkdir(parents=True, exist_ok=True)
    with open(L.LABS_ROOT / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def reserve(name: str, hosts: int) -> LabRecord:
    """Pick the lowest free lab index and write a 'building' lab.json, atomically among labs."""
    L.validate_name(name)
    with _labs_lock():
        if L.load_record(name) is not None:
            raise LabError(
                f"A lab named {name!r} already exists.", hint=f"Run 'vmshift lab down --name {name}' first."
            )
        used = {r.index for r in L.list_records()}
        # A root-namespace leg left by a lab whose record is gone still occupies its index.
        used |= {i for i in range(L.MAX_LABS) if root_link_exists(f"vmslab{i}-mgmt")}
        record = LabRecord(name=name, index=L.free_index(used), hosts=hosts)
        LabLayout(record.name, record.index, record.hosts)  # validates hosts
        record.save()
        return record


# ---------------------------------------------------------------- build


def _veth(a: str, a_ns: str | None, b: str, b_ns: str) -> None:
    args = ["ip", "link", "add", a]
    if a_ns is not None:
        args += ["netns", a_ns]
    run([*args, "type", "veth", "peer", "name", b, "netns", b_ns])


def _ip(ns: str, *args: str) -> None:
    run(["ip", "-n", ns, *args])


def _bridge(ns: str, name: str) -> None:
    _ip(ns, "link", "add", name, "type", "bridge", "stp_state", "0", "forward_delay", "0")
    _ip(ns, "link", "set", name, "up")


def _port(ns: str, ifname: str, bridge: str) -> None:
    _ip(ns, "link", "set", ifname, "master", bridge)
    _ip(ns, "link", "set", ifname, "up")


def _addr(ns: str, ifname: str, address: str) -> None:
    _ip(ns, "addr", "add", f"{address}/24", "dev", ifname)
    _ip(ns, "link", "set", ifname, "up")


def build(lay: LabLayout, migration_link_rate: str | None = None) -> None:
    """Create namespaces, bridges, veths and addresses of the lab (see docs/lab.md)."""
    for ns in lay.namespaces:
        if ns_exists(ns):
            raise LabError(
                f"Network namespace {ns} already exists.", hint=f"Run 'vmshift lab down --name {lay.name}'."
            )
    if root_link_exists(lay.root_veth):
        raise LabError(
            f"Interface {lay.root_veth} already exists in the root namespace.",
            hint=f"Run 'vmshift lab down --name {lay.name}' or remove it with 'ip link del {lay.root_veth}'.",
        )
    for ns in lay.namespaces:
        run(["ip", "netns", "add", ns])
        _ip(ns, "link", "set", "lo", "up")
    sw = lay.switch_ns
    for br in (L.SWITCH_VM_BRIDGE, L.SWITCH_MGMT_BRIDGE, L.SWITCH_MIG_BRIDGE):
        _bridge(sw, br)
    for k in lay.host_numbers:
        hns = lay.host_ns(k)
        _bridge(hns, L.HOST_VM_BRIDGE)
        _veth(L.HOST_UPLINK, hns, lay.switch_port(k, "vm"), sw)
        _port(hns, L.HOST_UPLINK, L.HOST_VM_BRIDGE)
        _port(sw, lay.switch_port(k, "vm"), L.SWITCH_VM_BRIDGE)
        _veth(L.HOST_MGMT, hns, lay.switch_port(k, "mgmt"), sw)
        _port(sw, lay.switch_port(k, "mgmt"), L.SWITCH_MGMT_BRIDGE)
        _addr(hns, L.HOST_MGMT, lay.host_mgmt_address(k))
        _veth(L.HOST_MIG, hns, lay.switch_port(k, "mig"), sw)
        _port(sw, lay.switch_port(k, "mig"), L.SWITCH_MIG_BRIDGE)
        _addr(hns, L.HOST_MIG, lay.host_mig_address(k))
    _veth(L.CLIENT_IF, lay.client_ns, L.SWITCH_CLIENT_PORT, sw)
    _port(sw, L.SWITCH_CLIENT_PORT, L.SWITCH_VM_BRIDGE)
    _addr(lay.client_ns, L.CLIENT_IF, lay.client_address)
    _veth(lay.root_veth, None, L.SWITCH_ROOT_PORT, sw)
    _port(sw, L.SWITCH_ROOT_PORT, L.SWITCH_MGMT_BRIDGE)
    run(["ip", "addr", "add", f"{lay.root_mgmt_address}/24", "dev", lay.root_veth])
    run(["ip", "link", "set", lay.root_veth, "up"])
    if lay.iscsi:
        _build_storage_network(lay)
    if migration_link_rate:
        for k in lay.host_numbers:
            set_migration_link_rate(lay, k, migration_link_rate)


def _build_storage_network(lay: LabLayout) -> None:
    """The storage network: a bridge in the switch, the storage box and one leg per host."""
    sw = lay.switch_ns
    _bridge(sw, L.SWITCH_STORAGE_BRIDGE)
    _veth(L.STORAGE_IF, lay.storage_ns, L.SWITCH_STORAGE_PORT, sw)
    _port(sw, L.SWITCH_STORAGE_PORT, L.SWITCH_STORAGE_BRIDGE)
    _addr(lay.storage_ns, L.STORAGE_IF, lay.storage_address)
    for k in lay.host_numbers:
        _veth(L.HOST_STORAGE, lay.host_ns(k), lay.switch_port(k, "sto"), sw)
        _port(sw, lay.switch_port(k, "sto"), L.SWITCH_STORAGE_BRIDGE)
        _addr(lay.host_ns(k), L.HOST_STORAGE, lay.host_storage_address(k))


# ---------------------------------------------------------------- migration link faults and shaping


def set_migration_link_rate(lay: LabLayout, host: int, rate: str | None) -> None:
    """Shape host's migration link in both directions with a tbf qdisc; None removes the shaping."""
    ends = [(lay.host_ns(host), L.HOST_MIG), (lay.switch_ns, lay.switch_port(host, "mig"))]
    if rate is None:
        for ns, ifname in ends:
            run(["tc", "-n", ns, "qdisc", "del", "dev", ifname, "root"], check=False)
        return
    bits = rate_bits_per_second(rate)
    # The bucket must hold at least one timer tick of traffic and a full GSO segment.
    burst = max(bits // 8 // 100, 128 * 1024)
    for ns, ifname in ends:
        run(["tc", "-n", ns, "qdisc", "replace", "dev", ifname, "root", "tbf",
             "rate", rate, "burst", str(burst), "latency", "50ms"])  # fmt: skip


def migration_link_qdisc(lay: LabLayout, host: int) -> str:
    """`tc qdisc show` of host's migration interface (for checks and tests)."""
    return run(["tc", "-n", lay.host_ns(host), "qdisc", "show", "dev", L.HOST_MIG])


def set_migration_link(lay: LabLayout, host: int, up: bool) -> None:
    """Plug or unplug host's migration cable at the switch (the host keeps its address, loses carrier)."""
    _ip(lay.switch_ns, "link", "set", lay.switch_port(host, "mig"), "up" if up else "down")


# ---------------------------------------------------------------- teardown


def existing_namespaces(lay: LabLayout) -> list[str]:
    return [ns for ns in lay.namespaces if ns_exists(ns)]


def namespace_pids(ns: str) -> list[int]:
    """Pids of processes living in namespace ns (agents, QEMU, probes)."""
    if not ns_exists(ns):
        return []
    out = run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def teardown(lay: LabLayout, remove_root_link: bool = True) -> list[str]:
    """Delete the lab's root veth and namespaces (whatever of them exists); returns leftover problems.

    Kill the processes inside the namespaces first: a namespace with live processes outlives
    `ip netns del`.
    """
    problems: list[str] = []
    if remove_root_link and root_link_exists(lay.root_veth):
        try:
            run(["ip", "link", "del", lay.root_veth])
        except LabError as e:
            problems.append(str(e))
    # the storage box too when the record no longer says the lab had one
    for ns in dict.fromkeys([*reversed(lay.namespaces), lay.storage_ns]):
        if ns_exists(ns):
            try:
                run(["ip", "netns", "del", ns])
            except LabError as e:
                problems.append(str(e))
    return problems
