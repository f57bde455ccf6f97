"""The host simulator speaks the agent protocol the server uses: enrollment with the fingerprint flow,
heartbeats over mutual TLS, VM lists the inventory adopts, and a stream model/host_stream decodes.

The simulator is for scale benchmarks only (docs/scale.md); these tests keep it honest, so a
benchmark on it measures the real server code paths.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ServerHarness, wait_for
from sqlalchemy.orm import Session

from vmshift.hostsim.fleet import vm_name
from vmshift.hostsim.main import Simulator, build, parser
from vmshift.hostsim.seed import seed_vms
from vmshift.model.enums import PowerState
from vmshift.model.host_stream import Keepalive, Snapshot, StreamCursor, Verdict, VmChanged, decode
from vmshift.tls.contexts import client_context


class SimThread:
    """The simulator on its own asyncio loop in a thread (as the process would run it)."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.sim: Simulator | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.sim = build(parser().parse_args(self.argv))
        await self.sim.start("127.0.0.1", 0)
        self._ready.set()
        await self._stop.wait()
        await self.sim.stop()

    def start(self) -> SimThread:
        self._thread.start()
        assert self._ready.wait(30), "the simulator did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def control(self) -> httpx.Client:
        assert self.sim is not None
        return httpx.Client(base_url=f"http://127.0.0.1:{self.sim.control.port}", trust_env=False)

    def hosts(self) -> list[dict[str, Any]]:
        with self.control as c:
            hosts: list[dict[str, Any]] = c.get("/hosts").json()
            return hosts


@pytest.fixture
def sim(server: ServerHarness, tmp_path: Path) -> Iterator[SimThread]:
    thread = SimThread(["--hosts", "2", "--vms", "3", "--ca-file", str(server.ca_file), "--state-dir",
                        str(tmp_path / "sim"), "--changes-per-s", "0", "--stats-interval", "0.5"]).start()
    yield thread
    thread.stop()


def server_tls(server: ServerHarness) -> ssl.SSLContext:
    """What the server presents to agents: its own certificate, agents verified against the CA."""
    files = server.tls_files
    return client_context(files.ca_cert, cert=files.cert, key=files.key)


def enroll(server: ServerHarness, sim: SimThread) -> list[dict[str, Any]]:
    hosts = sim.hosts()
    for h in hosts:
        r = server.client.post("/hosts", json={"address": h["address"], "fingerprint": h["fingerprint"]})
        assert r.status_code == 201, r.text
    return hosts


def test_enrolls_with_the_fingerprint_flow_and_its_vms_are_adopted(
    server: ServerHarness, sim: SimThread
) -> None:
    first = sim.hosts()[0]
    unconfirmed = server.client.post("/hosts", json={"address": first["address"]})
    assert unconfirmed.status_code == 409
    assert unconfirmed.json()["error"]["code"] == "fingerprint_unconfirmed"
    assert first["fingerprint"] in unconfirmed.json()["error"]["message"]
    assert server.client.get("/hosts").json() == []

    with sim.control as c:  # the benchmark's set-up: hosts join empty, then their VMs appear
        assert c.put("/vms", json={"per_host": 0}).json()["per_host"] == 0
    hosts = enroll(server, sim)
    assert {h["enrolled"] for h in sim.hosts()} == {True}
    names = [h["name"] for h in hosts]
    with Session(server._db) as s, s.begin():
        assert seed_vms(s, names, range(3), PowerState.POWERED_OFF) == 6
    with sim.control as c:
        assert c.put("/vms", json={"per_host": 3, "hosts": names}).status_code == 200

    def connected() -> bool:
        listed = server.client.get("/hosts").json()
        return len(listed) == 2 and all(h["connection_state"] == "connected" for h in listed)

    wait_for(connected, 15, "both simulated hosts connected")

    def all_on() -> bool:
        return {v["power_state"] for v in server.client.get("/vms").json()} == {"poweredOn"}

    wait_for(all_on, 15, "the simulated VMs adopted as powered on")
    with sim.control as c:  # one state change the server must notice through the agent protocol
        assert c.put("/changes", json={"per_s": 20}).status_code == 200

    def some_paused() -> list[str]:
        vms = server.client.get("/vms").json()
        assert sorted(v["name"] for v in vms) == sorted(vm_name(n, i) for n in names for i in range(3))
        return [v["name"] for v in vms if v["power_state"] == "paused"]

    assert wait_for(some_paused, 15, "a simulated VM paused in the inventory")
    critical = [e for e in server.client.get("/events", params={"limit": 500}).json()
                if e["severity"] == "critical"]
    assert critical == [], "no reconcile finding: the inventory holds every simulated VM"


def test_stream_decodes_and_resumes_without_repeats(server: ServerHarness, sim: SimThread) -> None:
    hosts = enroll(server, sim)
    address = hosts[0]["address"]
    with sim.control as c:
        assert c.put("/changes", json={"per_s": 40}).status_code == 200
    cursor = StreamCursor()
    applied: list[int] = []
    with httpx.Client(base_url=f"https://{address}/api/v1", verify=server_tls(server), trust_env=False,
                      timeout=10) as http:
        with http.stream("GET", "/stream", params=cursor.resume_params()) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"] == "application/x-ndjson"
            messages = []
            for line in resp.iter_lines():
                messages.append(decode(line))
                if sum(isinstance(m, VmChanged) for m in messages) >= 5:
                    break
        snapshot = messages[0]
        assert isinstance(snapshot, Snapshot)
        assert snapshot.facts.name == hosts[0]["name"]
        assert sorted(v.name for v in snapshot.vms) == [vm_name(hosts[0]["name"], i) for i in range(3)]
        for m in messages:
            verdict = cursor.accept(m)
            assert verdict is not Verdict.RESYNC, m
            if verdict is Verdict.APPLY and not isinstance(m, Snapshot):
                applied.append(m.seq)
        # resume from the cursor: no snapshot, the next change follows the last one applied
        with http.stream("GET", "/stream", params=cursor.resume_params()) as resp:
            lines = resp.iter_lines()
            resumed = [decode(next(lines)) for _ in range(3)]
    assert not any(isinstance(m, Snapshot) for m in resumed)
    for m in resumed:
        verdict = cursor.accept(m)
        assert verdict is not Verdict.RESYNC, m
        if verdict is Verdict.APPLY and not isinstance(m, Snapshot | Keepalive):
            applied.append(m.seq)
    assert applied[0] == snapshot.seq + 1 and len(applied) >= 5
    assert applied == list(range(applied[0], applied[0] + len(applied))), "every change once, in order"


def test_keepalives_stop_when_silent_and_the_server_marks_it_disconnected(
    server: ServerHarness, sim: SimThread
) -> None:
    hosts = enroll(server, sim)
    quiet = hosts[1]
    with (
        httpx.Client(base_url=f"https://{quiet['address']}/api/v1", verify=server_tls(server),
                     trust_env=False, timeout=httpx.Timeout(10, read=2.5)) as http,
        http.stream("GET", "/stream") as resp,
    ):
        lines = resp.iter_lines()
        assert isinstance(decode(next(lines)), Snapshot)
        with sim.control as c:
            assert c.post(f"/hosts/{quiet['name']}/silent").json()["silent"] is True
        with pytest.raises(httpx.ReadTimeout):  # the connection stays open, nothing comes
            for _ in range(10):
                next(lines)

    def states() -> dict[str, str]:
        return {h["name"]: h["connection_state"] for h in server.client.get("/hosts").json()}

    wait_for(lambda: states()[quiet["name"]] == "disconnected", 15, "the silent host disconnected")
    assert states()[hosts[0]["name"]] == "connected"
    with sim.control as c:
        c.post(f"/hosts/{quiet['name']}/loud")
    wait_for(lambda: states()[quiet["name"]] == "connected", 15, "the host connected again")


def test_only_the_servers_certificate_may_call(server: ServerHarness, sim: SimThread) -> None:
    address = sim.hosts()[0]["address"]
    anonymous = ssl.create_default_context()
    anonymous.check_hostname = False
    anonymous.verify_mode = ssl.CERT_NONE
    with pytest.raises(httpx.TransportError):  # no client certificate: refused in the handshake
        httpx.get(f"https://{address}/api/v1/vms", verify=anonymous, trust_env=False, timeout=5)
    with sim.control as c:
        bad = c.put("/vms", json={"per_host": -1})
        assert bad.status_code == 400 and "per_host" in bad.json()["error"]["message"]
        assert c.get("/hosts").json()[0]["vms"] == 3
