"""Agent side of live migration (issue 3, items 4-6), driven through the agent APIs only.

The session lab (tests/lab/conftest.py): its server only creates the VMs and gives them an IP; the
migrations themselves go: incoming on the target agent -> outgoing on the source agent -> progress.
Their ids start at ``IDS``, far above the ids the server hands out to the other tests' migrations, so
an agent's records of these never clash with a later one; the module deletes its VMs at its end.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

from tests.lab.helpers import LabHandle, qemu_pids, vmshift, wait_for
from vmshift.lab import lab as labmod
from vmshift.lab import processes
from vmshift.lab.layout import LabRecord, load_record
from vmshift.migration.grants import mint_grant

pytestmark = pytest.mark.lab
VM = "mig-1"
MIB = 1 << 20
IDS = 900_000


class Lab:
    def __init__(self, rec: LabRecord) -> None:
        self.rec = rec

    def addr(self, k: int) -> str:
        return self.rec.layout.agent_address(k)

    def agent(self, k: int) -> httpx.Client:
        """host-k's agent API as the server reaches it (the server's certificate)."""
        return processes.agent_http(self.rec.layout, k)

    def server(self) -> httpx.Client:
        return httpx.Client(base_url=f"{self.rec.server_url}/api/v1", trust_env=False, timeout=60,
                            headers={"Authorization": f"Bearer {self.rec.token}"},
                            verify=self.rec.server_tls())

    def spec(self, vm: str) -> dict[str, Any]:
        path = self.rec.layout.lab_dir / "datastores" / "shared-1" / vm / "vm.json"
        return dict(json.loads(path.read_text()))

    def check(self, vm: str) -> dict[str, Any]:
        return labmod.check(self.rec.name, vm)


@pytest.fixture(scope="module")
def mlab(lab: LabHandle) -> Iterator[Lab]:
    rec = load_record(lab.name)
    assert rec is not None
    try:
        yield Lab(rec)
    finally:  # leave the session lab as this module found it
        for name in (VM, "mig-2"):
            vmshift(lab, "vm", "stop", name, check=False)
            vmshift(lab, "vm", "delete", name, check=False)


def _healthy(lab: Lab, vm: str) -> dict[str, Any] | None:
    c = lab.check(vm)
    return c if c.get("echo") and c.get("memtest") and c.get("disklog") else None


def create_vm(lab: Lab, name: str, cpus: int = 1, memory_mib: int = 192) -> dict[str, Any]:
    """A lab guest on host-1 through the server (which gives it a NIC and an IP), booted and answering."""
    body = {"name": name, "host": "host-1", "cpus": cpus, "memory_mib": memory_mib, "datastore": "shared-1",
            "disks_mib": [64], "kernel_args": "vmshift.memtest=32,20 vmshift.disklog=1", "start": True}
    with lab.server() as s:
        r = s.post("/vms", json=body)
        assert r.status_code < 300, r.text
    with lab.agent(1) as a:
        wait_for(f"{name} to run on host-1",
                 lambda: a.get(f"/vms/{name}").json().get("power_state") == "poweredOn", timeout=120)
    wait_for(f"{name} to answer", lambda: _healthy(lab, name), timeout=120, interval=1)
    return lab.spec(name)


@pytest.fixture(scope="module")
def vm(mlab: Lab) -> dict[str, Any]:
    return create_vm(mlab, VM)


def start_migration(lab: Lab, src: int, dst: int, mid: int, settings: dict[str, Any] | None = None,
                    target_spec: dict[str, Any] | None = None, vm: str = VM) -> str:
    # as the server does: the target learns who may call it for this migration, the source the capability
    grant = mint_grant(f"host-{src}", 600)
    with lab.agent(dst) as a:
        r = a.post("/migrations/incoming", json={"migration_id": mid, "spec": target_spec or lab.spec(vm),
                                                 "grant": grant.model_dump(mode="json")})
        assert r.status_code == 200, r.text
        uri = str(r.json()["uri"])
        assert uri == f"tcp:{lab.rec.layout.host_mig_address(dst)}:{r.json()['port']}"
        listed = {v["name"]: v for v in a.get("/vms").json()}
        # the receiving QEMU is reported, marked with its migration: not a normal VM of the host yet
        assert listed[vm]["incoming_migration"] == mid, listed.get(vm)
    body = {"migration_id": mid, "vm": vm, "uri": uri, "settings": settings or {},
            "target_migration_address": lab.rec.layout.host_mig_address(dst),
            "target_agent": {"address": lab.addr(dst), "capability": grant.capability}}
    with lab.agent(src) as a:
        r = a.post("/migrations", json=body)
        assert r.status_code == 200, r.text
    return uri


def moving(agent: httpx.Client, mid: int) -> None:
    wait_for("pre-copy to move data",
             lambda: agent.get(f"/migrations/{mid}").json()["transferred_bytes"] > MIB,
             timeout=60, interval=0.1)


def wait_finished(lab: Lab, src: int, mid: int, timeout: float = 180) -> dict[str, Any]:
    with lab.agent(src) as a:
        def done() -> dict[str, Any] | None:
            p: dict[str, Any] = a.get(f"/migrations/{mid}").json()
            return p if p["status"] in ("completed", "failed", "cancelled") else None
        return wait_for(f"migration {mid} to finish", done, timeout=timeout, interval=0.5)


def runs_unpaused_on(lab: Lab, k: int, vm: str = VM) -> dict[str, Any]:
    with lab.agent(k) as a:
        rt: dict[str, Any] = a.get(f"/vms/{vm}").json()
    assert rt["power_state"] == "poweredOn" and rt["qemu_status"] == "running", rt
    return rt


def host_of_vm(lab: Lab) -> int:
    with lab.agent(1) as a:
        return 1 if a.get(f"/vms/{VM}").status_code == 200 else 2


def assert_gone_from(lab: Lab, k: int, vm: str = VM) -> None:
    with lab.agent(k) as a:
        assert vm not in [v["name"] for v in a.get("/vms").json()]
        assert a.get(f"/vms/{vm}").status_code == 404
    assert (lab.rec.layout.lab_dir / "datastores" / "shared-1" / vm / "vm.json").is_file(), \
        "the shared VM folder must survive"


def guest_intact_after(lab: Lab, before: dict[str, Any], vm: str = VM) -> dict[str, Any]:
    """Echo works, memtest clean after 2 more passes, disklog's durable sequence continued."""
    after = labmod.wait_memtest_passes(lab.rec.name, vm, before["memtest"]["passes"] + 2)
    assert after["memtest"]["mismatches"] == 0, after
    assert after["disklog"]["durable_seq"] > before["disklog"]["durable_seq"], after
    assert not after["disklog"].get("error"), after
    return after


def test_netperf_and_dirty_rate(mlab: Lab, vm: dict[str, Any]) -> None:
    with mlab.agent(2) as t, mlab.agent(1) as s:
        sink = t.post("/netperf/sink", json={"seconds": 3}).json()
        assert sink["address"] == mlab.rec.layout.host_mig_address(2)
        m = s.post("/netperf/measure", json={**sink, "seconds": 0.5}).json()
        assert m["reachable"] is True and m["bandwidth_bps"] > MIB, m
        bad = s.post("/netperf/measure", json={"address": sink["address"], "port": 9, "seconds": 0.5}).json()
        assert bad["reachable"] is False and bad["error"], bad
        rate = s.post(f"/vms/{VM}/dirty-rate", json={"seconds": 1}).json()
        assert rate["seconds"] == 1 and rate["dirty_rate_bps"] > MIB, rate  # memtest rewrites 20 MiB/s
        assert rate["resident_bytes"] > 32 * MIB, rate  # at least memtest's 32 MiB are resident


def test_live_migration_completes_and_guest_is_intact(mlab: Lab, vm: dict[str, Any]) -> None:
    before = wait_for("the guest", lambda: _healthy(mlab, VM), timeout=60)
    start_migration(mlab, 1, 2, IDS + 101)
    p = wait_finished(mlab, 1, IDS + 101)
    assert p["status"] == "completed", p
    met = p["metrics"]
    print("migration metrics:", json.dumps(met), "actions:", [a["kind"] for a in p["actions"]])
    assert met["total_ms"] and met["total_ms"] > 0 and met["downtime_ms"] is not None
    assert met["bytes_sent"] > 0 and met["rounds"] >= 1
    first = p["actions"][0]  # the policy's initial limit, set before `migrate`
    assert first["kind"] == "set_downtime_limit" and first["value"] == pytest.approx(0.03), first
    assert 30 <= p["downtime_limit_ms"] <= 500  # raised only if the rounds stopped shrinking
    rt = runs_unpaused_on(mlab, 2)
    assert_gone_from(mlab, 1)
    assert qemu_pids(vm["uuid"]) == [rt["pid"]], "exactly one QEMU: the target's"
    guest_intact_after(mlab, before)


def test_target_qemu_killed_in_precopy_rolls_back(mlab: Lab, vm: dict[str, Any]) -> None:
    src, dst, mid = 2, 1, IDS + 102
    running = runs_unpaused_on(mlab, src)
    before = wait_for("the guest", lambda: _healthy(mlab, VM), timeout=60)
    start_migration(mlab, src, dst, mid, {"bandwidth_limit_bps": 4 * MIB})
    with mlab.agent(src) as a:
        moving(a, mid)
    target = [pid for pid in qemu_pids(vm["uuid"]) if pid != running["pid"]]
    assert len(target) == 1
    psutil.Process(target[0]).send_signal(signal.SIGKILL)
    p = wait_finished(mlab, src, mid, timeout=60)
    assert p["status"] == "failed" and p["phase"] == "failed", p
    assert p["error"] and p["error"]["message"], p
    print("rollback reason:", p["error"]["message"])
    assert runs_unpaused_on(mlab, src)["pid"] == running["pid"]
    with mlab.agent(dst) as a:
        wait_for("the target to be cleaned up", lambda: a.get(f"/vms/{VM}").status_code == 404, timeout=30)
    assert_gone_from(mlab, dst)
    assert qemu_pids(vm["uuid"]) == [running["pid"]]
    guest_intact_after(mlab, before)


def test_user_cancel_rolls_back(mlab: Lab, vm: dict[str, Any]) -> None:
    src, dst, mid = 2, 1, IDS + 103
    running = runs_unpaused_on(mlab, src)
    start_migration(mlab, src, dst, mid, {"bandwidth_limit_bps": 4 * MIB})
    with mlab.agent(src) as a:
        moving(a, mid)
        t0 = time.monotonic()
        p = a.post(f"/migrations/{mid}/cancel").json()
        if p["status"] not in ("cancelled", "failed"):
            p = wait_finished(mlab, src, mid, timeout=30)
    assert p["status"] == "cancelled" and p["error"]["code"] == "cancelled", p
    print(f"cancel took {time.monotonic() - t0:.2f} s")
    assert runs_unpaused_on(mlab, src)["pid"] == running["pid"]
    assert_gone_from(mlab, dst)
    assert qemu_pids(vm["uuid"]) == [running["pid"]]
    assert wait_for("the guest", lambda: _healthy(mlab, VM), timeout=60)["memtest"]["mismatches"] == 0


def test_source_agent_restart_mid_migration_resumes(mlab: Lab, vm: dict[str, Any]) -> None:
    """SIGKILL the source agent in pre-copy: QEMU keeps migrating; the restarted agent finishes the job."""
    src, dst, mid = 2, 1, IDS + 104
    before = wait_for("the guest", lambda: _healthy(mlab, VM), timeout=60)
    start_migration(mlab, src, dst, mid, {"bandwidth_limit_bps": 40 * MIB})
    with mlab.agent(src) as a:
        moving(a, mid)
    processes.kill_agent(mlab.rec.name, src)
    processes.ensure_agent(mlab.rec.name, src)
    p = wait_finished(mlab, src, mid, timeout=120)
    assert p["status"] == "completed", p
    runs_unpaused_on(mlab, dst)
    assert_gone_from(mlab, src)
    guest_intact_after(mlab, before)


def test_cut_migration_link_rolls_back(mlab: Lab, vm: dict[str, Any]) -> None:
    from vmshift.lab import topology

    mid = IDS + 105
    src = host_of_vm(mlab)
    dst = 3 - src
    running = runs_unpaused_on(mlab, src)
    start_migration(mlab, src, dst, mid, {"bandwidth_limit_bps": 4 * MIB})
    with mlab.agent(src) as a:
        moving(a, mid)
    topology.set_migration_link(mlab.rec.layout, dst, up=False)
    try:
        p = wait_finished(mlab, src, mid, timeout=60)
    finally:
        topology.set_migration_link(mlab.rec.layout, dst, up=True)
    assert p["status"] == "failed", p
    print("link cut:", p["error"])
    assert runs_unpaused_on(mlab, src)["pid"] == running["pid"]
    assert_gone_from(mlab, dst)
    assert qemu_pids(vm["uuid"]) == [running["pid"]]


def test_postcopy_when_allowed_and_asked_for(mlab: Lab, vm: dict[str, Any]) -> None:
    """Post-copy allowed and asked for after 1 s, the link held to 16 MiB/s: the target runs the VM
    while its pages still arrive on demand. memtest, which verifies every page it reads, stays clean."""
    mid = IDS + 107
    src = host_of_vm(mlab)
    dst = 3 - src
    before = wait_for("the guest", lambda: _healthy(mlab, VM), timeout=60)
    start_migration(mlab, src, dst, mid,
                    {"allow_postcopy": True, "postcopy_after_s": 1.0, "bandwidth_limit_bps": 16 * MIB})
    p = wait_finished(mlab, src, mid, timeout=180)
    print("post-copy:", json.dumps(p["metrics"]), json.dumps(p["actions"]))
    assert p["status"] == "completed", p
    assert [a["kind"] for a in p["actions"]].count("start_postcopy") == 1, p["actions"]
    assert p["metrics"]["postcopy"] is True, p["metrics"]
    rt = runs_unpaused_on(mlab, dst)
    assert_gone_from(mlab, src)
    assert qemu_pids(vm["uuid"]) == [rt["pid"]]
    guest_intact_after(mlab, before)


def test_target_that_cannot_load_the_state_gives_the_vm_back(mlab: Lab) -> None:
    """The source completes the stream but the target cannot load it: the target was prepared with one
    vCPU for a 2-vCPU VM, so the second vCPU's state, sent only at switchover, is unknown to it. The
    target proves the VM never ran there, and the source resumes its paused copy."""
    name = "mig-2"
    spec = create_vm(mlab, name, cpus=2, memory_mib=128)
    running = runs_unpaused_on(mlab, 1, name)
    before = wait_for("the guest", lambda: _healthy(mlab, name), timeout=60)
    spec_file = mlab.rec.layout.lab_dir / "datastores" / "shared-1" / name / "vm.json"
    original = spec_file.read_text()
    for mid in (IDS + 106, IDS + 116):
        try:
            start_migration(mlab, 1, 2, mid, target_spec={**spec, "cpus": 1}, vm=name)
        finally:  # the target adopts the folder and wrote its (wrong) spec there: put the right one
            # back whole, as the agents write it (the source reads it meanwhile: a half-written file
            # made it think its VM was gone, "The source QEMU of VM 'mig-2' is not running")
            restoring = spec_file.with_suffix(".restore")
            restoring.write_text(original)
            restoring.replace(spec_file)
        p = wait_finished(mlab, 1, mid, timeout=120)
        print("failed load:", p["error"], "after", p.get("transferred_bytes"), "bytes")
        if p["error"]["code"] != "migration_failed" or p.get("transferred_bytes"):
            break
        # Seen once in CI: the target closed the stream before a byte of RAM (QEMU: "Connection reset
        # by peer"), so the load never reached the vCPUs. That is safe too (the VM never left the
        # source), but it is not the case under test: check the safe part and try once more.
        assert runs_unpaused_on(mlab, 1, name)["pid"] == running["pid"]
        assert_gone_from(mlab, 2, name)
    assert p["status"] == "failed" and p["error"]["code"] == "incoming_failed", p
    assert "never ran" in p["error"]["message"] and "resumed on the source" in p["error"]["message"], p
    assert runs_unpaused_on(mlab, 1, name)["pid"] == running["pid"]
    assert_gone_from(mlab, 2, name)
    with mlab.agent(2) as a:  # asking again gets the same answer, not a second chance
        again = a.post(f"/migrations/{mid}/activate")
        assert again.status_code == 409 and again.json()["error"]["code"] == "incoming_failed", again.text
    assert qemu_pids(spec["uuid"]) == [running["pid"]]
    guest_intact_after(mlab, before, name)
    with mlab.server() as s:  # free the lab hosts' CPU for whatever runs next
        assert s.post(f"/vms/{name}/power", json={"action": "stop"}).status_code < 300
