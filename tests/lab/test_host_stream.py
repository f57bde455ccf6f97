"""Issue 12, "agents push, the server listens", with real agents: a stream cut while its VM changes
ends with every change applied once, and a server restart while both agents stream ends with both
streams back and the inventory complete.

Two small VMs (1 vCPU, 128 MiB, no NIC, a 16 MiB disk on shared-1), one per host, serve both tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab.helpers import LabHandle, qemu_pids, vmshift, vmshift_json, wait_for
from tests.lab.vmotion import layout
from vmshift.client import VmshiftClient
from vmshift.lab import layout as L
from vmshift.lab import processes

pytestmark = pytest.mark.lab
VMS = {"hs-1": "host-1", "hs-2": "host-2"}
CUT_S = 4.0  # the management link is down this long: longer than the server's silence limit (3 s)

# Run inside a host's namespace: power actions through the agent's own address (reachable there
# while the management link is down), each one waited for until the agent's stream published it.
IN_HOST = r"""
import asyncio, json, sys
from vmshift.client.agent import AgentClient
from vmshift.lab.layout import load_record
from vmshift.lab.processes import agent_credentials
from vmshift.model.enums import PowerAction

lab, k, vm, *actions = sys.argv[1:]
lay = load_record(lab).layout

async def snapshot(agent):
    async for m in agent.stream({}, silence_s=3):
        return m

async def main():
    agent = AgentClient(lay.agent_address(int(k)), agent_credentials(lay))
    published = []
    for action in actions:
        before = (await snapshot(agent)).seq
        rt = await agent.power(vm, PowerAction(action))
        while True:
            snap = await snapshot(agent)
            states = {v.name: v.power_state.value for v in snap.vms}
            if snap.seq > before and states[vm] == rt.power_state.value:
                break
            await asyncio.sleep(0.1)
        published.append([action, rt.power_state.value, snap.seq])
    await agent.aclose()
    print(json.dumps(published))

asyncio.run(main())
"""


def power_inside(lab: LabHandle, k: int, vm: str, *actions: str) -> list[list[Any]]:
    out = subprocess.run(
        ["ip", "netns", "exec", layout(lab).host_ns(k), sys.executable, "-c", IN_HOST, lab.name, str(k), vm,
         *actions], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result: list[list[Any]] = json.loads(out.stdout)
    return result


def mgmt_link(lab: LabHandle, k: int, up: bool) -> None:
    subprocess.run(["ip", "-n", layout(lab).host_ns(k), "link", "set", L.HOST_MGMT, "up" if up else "down"],
                   check=True, timeout=30)  # fmt: skip


def events(api: VmshiftClient, target: str, kind: str) -> list[dict[str, Any]]:
    """Oldest first."""
    return [e for e in reversed(api.list_events(limit=500, target=target)) if e["kind"] == kind]


def reported(api: VmshiftClient, vm: str) -> list[str]:
    """The power changes the server adopted from its host's reports (not those of its own tasks)."""
    changes = events(api, vm, "vm.power_changed")
    return [e["message"].split(" (")[0] for e in changes if "as host" in e["message"]]


def agent_state(lab: LabHandle, k: int, vm: str) -> str:
    with processes.agent_http(layout(lab), k) as a:
        return str(a.get(f"/vms/{vm}").json()["power_state"])


def streaming(api: VmshiftClient, host: str) -> bool:
    h = api.get_host(host)
    s = h.get("stream") or {}
    return h["connection_state"] == "connected" and s.get("mode") == "stream" and bool(s.get("live"))


@pytest.fixture(scope="module")
def vms(lab: LabHandle, api: VmshiftClient) -> Iterator[dict[str, dict[str, Any]]]:
    made = {}
    try:
        for name, host in VMS.items():
            made[name] = dict(vmshift_json(
                lab, "vm", "create", name, "--host", host, "--cpus", "1", "--memory", "128",
                "--datastore", "shared-1", "--disk", "16M", "--image", "lab-guest", "--start",
            ))  # fmt: skip
        yield made
    finally:
        mgmt_link(lab, 1, True)
        for name in made:
            vmshift(lab, "vm", "stop", name, check=False)
            vmshift(lab, "vm", "delete", name, check=False)


def test_cut_mid_change_ends_with_every_change_once(
    lab: LabHandle, api: VmshiftClient, vms: dict[str, dict[str, Any]]
) -> None:
    wait_for("host-1 streaming", lambda: streaming(api, "host-1"), timeout=60)
    stream_before = api.get_host("host-1")["stream"]
    disconnects = len(events(api, "host-1", "host.disconnected"))
    connects = len(events(api, "host-1", "host.connected"))
    resyncs = len(events(api, "host-1", "host.stream_resynced"))  # an agent restart earlier needs one
    changes_before = reported(api, "hs-1")

    mgmt_link(lab, 1, False)
    try:
        done = power_inside(lab, 1, "hs-1", "pause", "resume", "pause")
        assert [d[1] for d in done] == ["paused", "poweredOn", "paused"], done
        wait_for("the server to show host-1 disconnected",
                 lambda: api.get_host("host-1")["connection_state"] == "disconnected", timeout=CUT_S + 10)
    finally:
        mgmt_link(lab, 1, True)

    wait_for("host-1 streaming again", lambda: streaming(api, "host-1"), timeout=60)
    wait_for("the changes to be applied",
             lambda: api.get_host("host-1")["stream"]["seq"] >= done[-1][2], timeout=30)
    assert api.get_vm("hs-1")["power_state"] == "paused" == agent_state(lab, 1, "hs-1")
    assert reported(api, "hs-1")[len(changes_before):] == [
        "VM hs-1 is now paused", "VM hs-1 is now poweredOn", "VM hs-1 is now paused"]
    assert len(events(api, "host-1", "host.disconnected")) == disconnects + 1
    assert len(events(api, "host-1", "host.connected")) == connects + 1
    after = api.get_host("host-1")["stream"]
    assert after["epoch"] == stream_before["epoch"] and after["reconnects"] > stream_before["reconnects"]
    assert len(events(api, "host-1", "host.stream_resynced")) == resyncs, "resumed, not resynchronised"

    vmshift(lab, "vm", "resume", "hs-1")
    assert agent_state(lab, 1, "hs-1") == "poweredOn"


def test_server_restart_while_two_agents_stream(
    lab: LabHandle, api: VmshiftClient, vms: dict[str, dict[str, Any]]
) -> None:
    for host in ("host-1", "host-2"):
        wait_for(f"{host} streaming", lambda h=host: streaming(api, h), timeout=60)
    processes.stop_server(lab.name)
    try:
        # behind the stopped server's back: hs-2 paused (the new server learns it from host-2's snapshot)
        assert power_inside(lab, 2, "hs-2", "pause")[0][1] == "paused"
    finally:
        processes.start_server(lab.name)
    wait_for("the server to answer", lambda: api.about(), timeout=60)
    for host in ("host-1", "host-2"):
        wait_for(f"{host} streaming to the new server", lambda h=host: streaming(api, h), timeout=60)
        assert api.get_host(host)["stream"]["reconnects"] == 0
    expected = {"hs-1": ("host-1", "poweredOn"), "hs-2": ("host-2", "paused")}

    def inventory() -> dict[str, tuple[str, str]] | None:
        found = {v["name"]: (v["host"], v["power_state"]) for v in api.list_vms() if v["name"] in VMS}
        return found if found == expected else None

    wait_for("the inventory to show what the agents report", inventory, timeout=10)
    for name, host in VMS.items():
        assert agent_state(lab, int(host[-1]), name) == expected[name][1]
        assert len(qemu_pids(vms[name]["uuid"])) == 1
    assert reported(api, "hs-2")[-1] == "VM hs-2 is now paused"
