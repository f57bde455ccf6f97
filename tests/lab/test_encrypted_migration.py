"""Encrypted migration (issue 9, item 2), agent side: QEMU's TLS with the hosts' cluster certificates.

Driven at the agent level (incoming on the target with ``tls``, then outgoing on the source), so it
needs no server policy. Each lab host gets its issued certificate from the lab server's CA (a test CA
when the server has none) unless it holds one already. One small guest moves back and forth; the
target host's migration link is captured (AF_PACKET, tests/lab/link_capture.py) to show that a plain
stream carries the guest's memtest pages and an encrypted one does not.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.lab import link_capture
from tests.lab.helpers import LabHandle, qemu_pids, wait_for
from tests.lab.test_agent_migration import (
    Lab,
    assert_gone_from,
    create_vm,
    guest_intact_after,
    runs_unpaused_on,
    wait_finished,
)
from vmshift.lab import certs
from vmshift.lab.layout import HOST_MIG, load_record
from vmshift.migration.disk_plan import relocated_spec
from vmshift.migration.grants import mint_grant
from vmshift.model.vm import VmSpec
from vmshift.tls.files import HostTlsFiles

pytestmark = pytest.mark.lab
VM = "enc-1"
MIB = 1 << 20
CAPTURE = Path(link_capture.__file__)
#: slow enough for the capture to keep up and for the test to see the stream while it runs
RATE = {"bandwidth_limit_bps": 32 * MIB}


def name_of(lab: Lab, k: int) -> str:
    return certs.host_name(lab.rec, k)


@pytest.fixture(scope="module")
def elab(lab: LabHandle) -> Lab:
    rec = load_record(lab.name)
    assert rec is not None
    return Lab(rec)


@pytest.fixture(scope="module")
def enrolled(elab: Lab) -> dict[int, HostTlsFiles]:
    """Each lab host's issued certificate, as the server would issue it (kept when it has one)."""
    return certs.enroll_hosts(elab.rec)


@pytest.fixture(scope="module")
def vm(elab: Lab, enrolled: dict[int, HostTlsFiles]) -> Iterator[dict[str, Any]]:
    spec = create_vm(elab, VM, memory_mib=128)
    yield spec
    for k in elab.rec.layout.host_numbers:  # free the lab's CPU for the tests after this module
        with elab.agent(k) as a:
            if a.get(f"/vms/{VM}").status_code == 200:
                a.post(f"/vms/{VM}/power", json={"action": "stop"})


def host_of(lab: Lab) -> int:
    for k in lab.rec.layout.host_numbers:
        with lab.agent(k) as a:
            if a.get(f"/vms/{VM}").status_code == 200:
                return k
    raise AssertionError(f"{VM} runs on no lab host")


def grant_for(lab: Lab, src: int) -> tuple[dict[str, Any], str]:
    """As the server does: the target's grant for the source host, and the source's capability."""
    grant = mint_grant(f"host-{src}", 600)
    return grant.model_dump(mode="json"), grant.capability


def target_of(lab: Lab, dst: int, capability: str) -> dict[str, Any]:
    """The outgoing request's fields naming the target (as the server builds them)."""
    return {"target_migration_address": lab.rec.layout.host_mig_address(dst),
            "target_agent": {"address": lab.addr(dst), "capability": capability}}


def new_id() -> int:
    return 900_000 + secrets.randbelow(99_999)  # agent-level ids, apart from the server's


def start(lab: Lab, src: int, dst: int, mid: int, *, tls: bool, authorised: str | None = None) -> None:
    """Incoming on the target (``tls.peer``: the host it accepts, the source unless ``authorised``),
    then outgoing on the source (``tls.peer``: the target)."""
    grant, capability = grant_for(lab, src)
    incoming: dict[str, Any] = {"migration_id": mid, "spec": lab.spec(VM), "grant": grant}
    if tls:
        incoming["tls"] = {"peer": authorised or name_of(lab, src)}
    with lab.agent(dst) as a:
        r = a.post("/migrations/incoming", json=incoming)
        assert r.status_code == 200, r.text
        uri = str(r.json()["uri"])
    body: dict[str, Any] = {"migration_id": mid, "vm": VM, "uri": uri, "settings": RATE,
                            **target_of(lab, dst, capability)}
    if tls:
        body["tls"] = {"peer": name_of(lab, dst)}
    with lab.agent(src) as a:
        r = a.post("/migrations", json=body)
        assert r.status_code == 200, r.text


@contextmanager
def captured(lab: Lab, k: int, path: Path) -> Iterator[dict[str, Any]]:
    """Capture host k's migration interface while the block runs; the capture's counters after it."""
    proc = subprocess.Popen(["ip", "netns", "exec", lab.rec.layout.host_ns(k), sys.executable, str(CAPTURE),
                             HOST_MIG, str(path)], stdout=subprocess.PIPE, text=True)
    result: dict[str, Any] = {}
    try:
        assert proc.stdout is not None
        assert "listening" in proc.stdout.readline(), "the capture did not start"
        yield result
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    result.update(json.loads(out.strip().splitlines()[-1]))
    result["memtest_words"] = link_capture.memtest_words(path)
    result["tls_records"] = link_capture.tls_records(path)
    print(f"capture of host-{k}'s {HOST_MIG}: {json.dumps(result)}")


def test_host_without_certificate_refuses_tls(elab: Lab, vm: dict[str, Any],
                                              enrolled: dict[int, HostTlsFiles]) -> None:
    src = host_of(elab)
    dst = 3 - src
    hidden = [(f.cert, f.cert.with_name("host.pem.hidden")) for f in enrolled.values()]
    for path, away in hidden:
        path.rename(away)
    try:
        with elab.agent(dst) as a:
            assert a.get("/facts").json()["migration_tls"] is False
            r = a.post("/migrations/incoming", json={"migration_id": new_id(), "spec": elab.spec(VM),
                                                     "grant": grant_for(elab, src)[0],
                                                     "tls": {"peer": name_of(elab, src)}})
            assert r.status_code == 409, r.text
            err = r.json()["error"]
            assert "no cluster certificate" in err["message"] and "vmshift host add" in err["hint"], err
            assert a.get(f"/vms/{VM}").status_code == 404, "nothing may be prepared"
        with elab.agent(src) as a:
            r = a.post("/migrations", json={
                "migration_id": new_id(), "vm": VM, "uri": f"tcp:{elab.rec.layout.host_mig_address(dst)}:1",
                **target_of(elab, dst, grant_for(elab, src)[1]), "tls": {"peer": name_of(elab, dst)}})
            assert r.status_code == 409 and "no cluster certificate" in r.json()["error"]["message"], r.text
        runs_unpaused_on(elab, src, VM)
    finally:
        for path, away in hidden:
            away.rename(path)
    for k in enrolled:
        with elab.agent(k) as a:
            assert a.get("/facts").json()["migration_tls"] is True


def test_encrypted_stream_carries_no_guest_memory(elab: Lab, vm: dict[str, Any], tmp_path: Path) -> None:
    src = host_of(elab)
    dst, mid = 3 - src, new_id()
    before = guest_intact_after(elab, elab.check(VM), VM)
    with captured(elab, dst, tmp_path / "tls.raw") as cap:
        start(elab, src, dst, mid, tls=True)
        with elab.agent(src) as s, elab.agent(dst) as t:
            def moving() -> dict[str, Any] | None:
                p: dict[str, Any] = s.get(f"/migrations/{mid}").json()
                return p if p["transferred_bytes"] > MIB else None

            live = wait_for("the encrypted stream to move data", moving, timeout=60, interval=0.1)
            assert live["encrypted"] is True, live  # the source QEMU's tls-creds
            state = t.get(f"/migrations/{mid}/incoming").json()
            assert state["stream"] == "active" and state["encrypted"] is True, state  # the target's
        p = wait_finished(elab, src, mid)
    assert p["status"] == "completed" and p["encrypted"] is True, p
    rt = runs_unpaused_on(elab, dst, VM)
    assert_gone_from(elab, src, VM)
    assert qemu_pids(vm["uuid"]) == [rt["pid"]]
    guest_intact_after(elab, before, VM)
    assert cap["bytes"] >= p["transferred_bytes"] * 0.9 and cap["dropped"] == 0, (cap, p["transferred_bytes"])
    assert cap["tls_records"] > 100, cap
    assert cap["memtest_words"] == 0, f"guest memory in the encrypted stream: {cap}"


def test_plain_stream_carries_guest_memory(elab: Lab, vm: dict[str, Any], tmp_path: Path) -> None:
    """The same capture of a plain stream finds the memtest pages (so the capture would see them);
    the VM's QEMU received an encrypted stream before, so this also shows its TLS was reset."""
    src = host_of(elab)
    dst, mid = 3 - src, new_id()
    before = elab.check(VM)
    with captured(elab, dst, tmp_path / "plain.raw") as cap:
        start(elab, src, dst, mid, tls=False)
        p = wait_finished(elab, src, mid)
    assert p["status"] == "completed" and p["encrypted"] is False, p
    runs_unpaused_on(elab, dst, VM)
    guest_intact_after(elab, before, VM)
    assert cap["memtest_words"] > 1000, cap  # 32 MiB of memtest pages: thousands of marked pairs


def test_wrong_peer_is_refused_and_the_vm_stays(elab: Lab, vm: dict[str, Any]) -> None:
    """The target accepts only the host its tls.peer names: told to expect itself, it refuses the
    source's certificate; the VM keeps running on the source, whose next plain migration works."""
    src = host_of(elab)
    dst, mid = 3 - src, new_id()
    running = runs_unpaused_on(elab, src, VM)
    before = elab.check(VM)
    start(elab, src, dst, mid, tls=True, authorised=name_of(elab, dst))
    p = wait_finished(elab, src, mid, timeout=60)
    assert p["status"] == "failed" and "The stream was encrypted" in p["error"]["message"], p
    print("wrong peer:", p["error"])
    assert runs_unpaused_on(elab, src, VM)["pid"] == running["pid"]
    with elab.agent(dst) as a:
        wait_for("the target to be cleaned up", lambda: a.get(f"/vms/{VM}").status_code == 404, timeout=30)
    assert qemu_pids(vm["uuid"]) == [running["pid"]]
    again = new_id()
    start(elab, src, dst, again, tls=False)
    p = wait_finished(elab, src, again)
    assert p["status"] == "completed" and p["encrypted"] is False, p
    runs_unpaused_on(elab, dst, VM)
    guest_intact_after(elab, before, VM)


def test_encrypted_relocate_moves_the_disks_over_tls_too(elab: Lab, vm: dict[str, Any]) -> None:
    """Shared-nothing: the target's NBD server takes only TLS clients with the source's certificate
    (tls-creds + tls-authz), so the mirrors completing proves the disks went over TLS as well. Last
    in the module: the VM leaves shared-1 for the target's local datastore."""
    src = host_of(elab)
    dst, mid = 3 - src, new_id()
    before = elab.check(VM)
    target_spec = relocated_spec(VmSpec.model_validate(elab.spec(VM)), f"local-host-{dst}")
    grant, capability = grant_for(elab, src)
    with elab.agent(dst) as a:
        r = a.post("/migrations/incoming", json={
            "migration_id": mid, "spec": target_spec.model_dump(mode="json"), "relocate": True,
            "grant": grant, "tls": {"peer": name_of(elab, src)}})
        assert r.status_code == 200, r.text
        incoming = r.json()
    assert len(incoming["nbd"]) == len(target_spec.disks)
    with elab.agent(src) as a:
        r = a.post("/migrations", json={
            "migration_id": mid, "vm": VM, "uri": incoming["uri"], "settings": RATE,
            **target_of(elab, dst, capability),
            "mirror_targets": incoming["nbd"], "tls": {"peer": name_of(elab, dst)}})
        assert r.status_code == 200, r.text
    p = wait_finished(elab, src, mid)
    assert p["status"] == "completed" and p["encrypted"] is True and p["mirror_bytes"] > 0, p
    runs_unpaused_on(elab, dst, VM)
    guest_intact_after(elab, before, VM)
