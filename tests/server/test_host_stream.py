"""The server listens to host streams (server/host_listener.py) of fake agents: changes arrive, a cut
and a resume apply every change once, an agent restart is resynchronised with a snapshot, an agent
without /stream is polled (announced once), and a silent stream shows its host disconnected in ~3 s."""

from __future__ import annotations

import time
from typing import Any

from conftest import AgentFactory, ServerHarness, wait_for
from vmshift_fake_agent import FakeAgent

from vmshift.model.enums import PowerState
from vmshift.model.host_stream import KEEPALIVE_INTERVAL_S

BODY = {"name": "vm-1", "host": "host-1", "datastore": "shared-1", "memory_mib": 128, "start": True}


def events(server: ServerHarness, target: str, kind: str) -> list[dict[str, Any]]:
    """Oldest first."""
    found: list[dict[str, Any]] = server.client.get(f"/events?target={target}&limit=1000").json()
    return [e for e in reversed(found) if e["kind"] == kind]


def reported(server: ServerHarness) -> list[str]:
    """The power changes the server adopted from host-1's reports (not those of its own tasks)."""
    changes = events(server, "vm-1", "vm.power_changed")
    return [e["message"] for e in changes if "as host host-1" in e["message"]]


def host(server: ServerHarness) -> dict[str, Any]:
    body: dict[str, Any] = server.client.get("/hosts/host-1").json()
    return body


def power_state(server: ServerHarness) -> str:
    return str(server.client.get("/vms/vm-1").json()["power_state"])


def streaming_host_with_vm(server: ServerHarness, agents: AgentFactory) -> FakeAgent:
    agent, thread = agents("host-1", stream=True)
    server.add_host(thread)
    assert server.wait_task(server.client.post("/vms", json=BODY).json()["id"])["state"] == "success"
    wait_for(lambda: (host(server)["stream"] or {}).get("live"), 10, "the host's stream to be in sync")
    # until REPORT_LAG_S after a task, the server takes reports as possibly older than the task
    keepalives = agent.vm_lists
    wait_for(lambda: agent.vm_lists >= keepalives + 4, 10, "0.8 s of keepalives after the task")
    return agent


def change_behind_the_back(agent: FakeAgent, state: PowerState) -> None:
    rt = agent.vms["vm-1"]
    rt.power_state, rt.qemu_status = state, "paused" if state is PowerState.PAUSED else "running"


def test_streamed_changes_arrive(server: ServerHarness, agents: AgentFactory) -> None:
    agent = streaming_host_with_vm(server, agents)
    assert agent.stream_opens[0] == {"epoch": None, "since": None}, "a new server asks for a snapshot"
    stream = host(server)["stream"]
    assert stream["mode"] == "stream" and stream["epoch"] == agent.log.epoch

    change_behind_the_back(agent, PowerState.PAUSED)
    wait_for(lambda: power_state(server) == "paused", 10, "the streamed pause to be adopted")
    assert reported(server) == ["VM vm-1 is now paused (was poweredOn), as host host-1 reports."]
    wait_for(lambda: host(server)["stream"]["seq"] == agent.log.last_seq, 5, "the server at the agent's seq")
    assert events(server, "host-1", "host.polled") == []
    assert len(agent.stream_opens) == 1, "one stream, never reopened while nothing broke"


def test_cut_and_resume_apply_every_change_once(server: ServerHarness, agents: AgentFactory) -> None:
    agent = streaming_host_with_vm(server, agents)
    agent.repeat_tail = 2  # the resumed stream repeats two changes the server already applied
    before = agent.log.last_seq

    agent.down = True  # the stream ends, and reconnects are refused for a while
    wait_for(lambda: agent.open_streams == 0, 5, "the stream to end")
    for state in (PowerState.PAUSED, PowerState.POWERED_ON, PowerState.PAUSED):  # each one change
        change_behind_the_back(agent, state)
        agent.publish()
    assert agent.log.last_seq == before + 3
    agent.down = False

    wait_for(lambda: host(server)["stream"]["seq"] == agent.log.last_seq, 10, "the resumed changes")
    assert agent.stream_opens[-1] == {"epoch": agent.log.epoch, "since": before}, "resumed, not restarted"
    wait_for(lambda: power_state(server) == "paused", 5, "the final state")
    changes = reported(server)
    assert [m.split(" (")[0] for m in changes] == ["VM vm-1 is now paused", "VM vm-1 is now poweredOn",
                                                   "VM vm-1 is now paused"], changes  # fmt: skip
    assert events(server, "host-1", "host.stream_resynced") == [], "a resume needs no snapshot"
    assert events(server, "host-1", "host.disconnected") == [], "down for less than the silence limit"
    assert host(server)["stream"]["reconnects"] >= 1


def test_agent_restart_is_resynchronised_with_one_snapshot(
    server: ServerHarness, agents: AgentFactory
) -> None:
    agent = streaming_host_with_vm(server, agents)
    old_epoch = agent.log.epoch
    agent.restart_log()  # a new epoch, its numbers begin again; the VM stopped meanwhile
    agent.vms["vm-1"].power_state, agent.vms["vm-1"].qemu_status = PowerState.POWERED_OFF, None

    wait_for(lambda: host(server)["stream"]["epoch"] == agent.log.epoch, 10, "the new epoch")
    wait_for(lambda: power_state(server) == "poweredOff", 5, "the snapshot's state")
    assert agent.stream_opens[-1]["epoch"] == old_epoch, "the server asked to resume the old epoch"
    (resynced,) = events(server, "host-1", "host.stream_resynced")
    assert "full report" in resynced["message"]
    assert reported(server) == ["VM vm-1 is now poweredOff (was poweredOn), as host host-1 reports."]


def test_agent_without_stream_is_polled_and_announced_once(
    server: ServerHarness, agents: AgentFactory
) -> None:
    agent, thread = agents("host-1", stream=False)
    server.add_host(thread)
    assert server.wait_task(server.client.post("/vms", json=BODY).json()["id"])["state"] == "success"
    lists = agent.vm_lists
    wait_for(lambda: agent.vm_lists >= lists + 3, 10, "three polls")
    (polled,) = events(server, "host-1", "host.polled")
    assert "polled" in polled["message"] and "host stream" in polled["message"], polled
    assert host(server)["stream"]["mode"] == "polling"
    assert len(agent.stream_opens) == 1, "asked once for a stream, then polled"

    change_behind_the_back(agent, PowerState.PAUSED)
    wait_for(lambda: power_state(server) == "paused", 10, "the polled pause to be adopted")
    assert len(events(server, "host-1", "host.polled")) == 1


def test_silent_stream_shows_host_disconnected_in_about_three_seconds(
    server: ServerHarness, agents: AgentFactory
) -> None:
    agent = streaming_host_with_vm(server, agents)
    limit = server.settings.missed_heartbeats * KEEPALIVE_INTERVAL_S
    agent.silent = True  # nothing more on the stream; its TCP connection stays open
    silent_at = time.monotonic()
    wait_for(lambda: host(server)["connection_state"] == "disconnected", 10, "the host disconnected")
    took = time.monotonic() - silent_at
    assert limit - 0.5 <= took <= limit + 1.0, f"disconnected after {took:.1f} s (limit {limit:g} s)"
    (gone,) = events(server, "host-1", "host.disconnected")
    assert "silent" in gone["message"]

    agent.silent = False
    wait_for(lambda: host(server)["connection_state"] == "connected", 10, "the host connected again")
    assert len(events(server, "host-1", "host.connected")) == 1
    assert len(events(server, "host-1", "host.disconnected")) == 1
    assert power_state(server) == "poweredOn"
