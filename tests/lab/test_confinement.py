"""QEMU confined (issue 9, item 4): its sandbox, its user, the files prepared for it, the capped serial log.

One VM on host-1 whose guest writes its serial console flat out for 50 s
(``vmshift.serialflood=50``). The agents run with the smallest serial log cap they accept (64 KiB), so
the flood passes it hundreds of times over; host-1's agent is restarted in the middle of the flood and
the VM moves twice: the log must go on, stay under its cap and end with the guest's last lines.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import re
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.lab.helpers import LabHandle, guest_check, qemu_pids, vmshift, vmshift_json, wait_for
from vmshift.agent.config import MIN_SERIAL_LOG_CAP_BYTES
from vmshift.client import VmshiftClient
from vmshift.lab import processes
from vmshift.lab.layout import LabLayout, load_record
from vmshift.qemu.cmdline import SANDBOX, tap_name

pytestmark = pytest.mark.lab

VM = "conf-1"
CAP = MIN_SERIAL_LOG_CAP_BYTES  # 64 KiB: the flood passes it hundreds of times within seconds
# Long enough for an agent restart, a vMotion and a Storage vMotion (about 20 s here, 35 s with other
# labs loading the machine); the test fails, not passes, if the flood ends before the moves do.
FLOOD_S = 50
HOSTS = (1, 2)
QEMU_USER = "vmshift-qemu"
DONE = re.compile(r"vmshift-guest: serialflood done lines=(\d+)")
FLOOD_LINE = re.compile(r"vmshift-flood (\d+) ")


def layout(lab: LabHandle) -> LabLayout:
    rec = load_record(lab.name)
    assert rec is not None
    return rec.layout


def agent_client(lab: LabHandle, host: int) -> httpx.Client:
    """host's agent API as the server reaches it (its certificate)."""
    return processes.agent_http(layout(lab), host, timeout=30)


def serial(lab: LabHandle, host: int = 1, tail_bytes: int = CAP) -> str:
    """The end of the VM's serial log, from the agent of ``host`` (the server has no serial route)."""
    with agent_client(lab, host) as c:
        r = c.get(f"/vms/{VM}/serial", params={"tail_bytes": tail_bytes})
        assert r.status_code == 200, r.text
        return r.text


def last_flood_line(text: str) -> int:
    return max((int(n) for n in FLOOD_LINE.findall(text)), default=0)


def restart_agents(lab: LabHandle, api: VmshiftClient, *hosts: int) -> None:
    """Restart each agent, then wait for all of them to reconnect (the waits overlap)."""
    for host in hosts:
        processes.restart_agent(lab.name, host)
    def connected(name: str) -> bool:
        return bool(api.get_host(name)["connection_state"] == "connected")

    for host in hosts:
        wait_for(f"host-{host} to reconnect", functools.partial(connected, f"host-{host}"), timeout=90)


@pytest.fixture(scope="module")
def vm(lab: LabHandle, api: VmshiftClient) -> Iterator[dict[str, Any]]:
    """Both agents with a small serial cap, then one flooding VM on host-1."""
    originals = {}
    for host in HOSTS:
        config_file = layout(lab).agent_config(host)
        originals[host] = config_file.read_text()
        config_file.write_text(json.dumps({**json.loads(originals[host]), "serial_log_cap_bytes": CAP}))
    restart_agents(lab, api, *HOSTS)
    try:
        yield dict(vmshift_json(
            lab, "vm", "create", VM, "--host", "host-1", "--cpus", "1", "--memory", "128",
            "--datastore", "shared-1", "--network", "VM Network", "--disk", "64M", "--image", "lab-guest",
            "--kernel-args", f"vmshift.serialflood={FLOOD_S}", "--start",
        ))
    finally:
        vmshift(lab, "vm", "stop", VM, check=False)
        vmshift(lab, "vm", "delete", VM, check=False)
        for host, original in originals.items():
            layout(lab).agent_config(host).write_text(original)
        restart_agents(lab, api, *originals)


def mode_owner(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def test_qemu_runs_sandboxed_as_its_own_user(lab: LabHandle, api: VmshiftClient, vm: dict[str, Any]) -> None:
    user = pwd.getpwnam(QEMU_USER)  # `vmshift lab up` creates it
    pids = qemu_pids(vm["uuid"])
    assert len(pids) == 1, pids
    proc = psutil.Process(pids[0])
    assert set(proc.uids()) == {user.pw_uid}, "real, effective and saved uid are all vmshift-qemu"
    assert set(proc.gids()) == {user.pw_gid}
    cmdline = proc.cmdline()
    assert cmdline[cmdline.index("-sandbox") + 1] == SANDBOX
    assert "-runas" not in cmdline
    status = Path(f"/proc/{proc.pid}/status").read_text()
    assert re.search(r"^Seccomp:\s+2$", status, re.M), "a seccomp filter is loaded"
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
    host = api.get_host("host-1")
    assert host["facts"]["qemu_user"] == QEMU_USER, host["facts"]

    tap = tap_name(vm["uuid"], 0)
    owner = subprocess.run(
        ["ip", "netns", "exec", layout(lab).host_ns(1), "cat", f"/sys/class/net/{tap}/owner"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert owner == str(user.pw_uid), "the tap belongs to vmshift-qemu"


def test_files_are_prepared_for_qemu_and_closed_to_others(lab: LabHandle, vm: dict[str, Any]) -> None:
    user = pwd.getpwnam(QEMU_USER)
    lay = layout(lab)
    folder = lay.shared_datastore / VM
    assert mode_owner(folder) == (0o710, 0, user.pw_gid), "root's folder QEMU may only pass through"
    disks = list(folder.glob("*.qcow2"))
    assert disks and all(mode_owner(d) == (0o600, user.pw_uid, user.pw_gid) for d in disks)
    for own in ("vm.json", "serial.log"):  # the agent's files: QEMU can neither read nor replace them
        assert mode_owner(folder / own)[:2] == (0o600, 0), own

    state = lay.agent_state_dir(1)
    assert mode_owner(state) == (0o700, 0, 0)
    qmp = state / "vms" / VM / "qmp.sock"
    assert stat.S_ISSOCK(qmp.stat().st_mode) and mode_owner(qmp)[:2] == (0o600, 0)
    for path in state.rglob("*"):  # records, sockets, logs: nothing for other users
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.is_dir():  # QEMU's user may get a search-only ACL entry on tls/ (its TLS files)
            assert mode & 0o067 == 0, path
        else:
            assert mode & 0o077 == 0, path
    assert mode_owner(lay.server_dir)[0] == 0o700
    db = lay.server_dir / "vmshift.db"
    if db.exists():
        assert mode_owner(db)[0] & 0o077 == 0


def capped(*folders: Path) -> int:
    """Each folder's serial log is within the cap now; the bytes it holds."""
    held = 0
    for folder in folders:
        sizes = [p.stat().st_size for p in (folder / "serial.log", folder / "serial.log.1") if p.exists()]
        assert sum(sizes) <= CAP and all(s <= CAP // 2 for s in sizes), (folder, sizes)
        held = max(held, sum(sizes))
    return held


def test_a_flooding_guest_stays_under_the_serial_cap(lab: LabHandle, api: VmshiftClient,
                                                     vm: dict[str, Any]) -> None:
    """The flood goes on through an agent restart, a vMotion and a Storage vMotion; the log follows
    the VM and stays under its cap throughout."""
    lay = layout(lab)
    shared, local = lay.shared_datastore / VM, lay.local_datastore(2) / VM
    seen = wait_for("the guest to flood its console", lambda: last_flood_line(serial(lab)), timeout=120)
    flooding_since = time.monotonic()

    restart_agents(lab, api, 1)  # the ring in QEMU keeps the output until the new agent reads it
    capped(shared)
    after_restart = wait_for("the log to go on after the agent restart",
                             lambda: (n := last_flood_line(serial(lab))) > seen and n, timeout=30)

    m = dict(vmshift_json(lab, "vm", "migrate", VM, "--host", "host-2", timeout=600))
    assert m["status"] == "completed", m.get("error")
    capped(shared)
    after_vmotion = wait_for("the log to go on on host-2",
                             lambda: (n := last_flood_line(serial(lab, 2))) > after_restart and n, timeout=30)

    m = dict(vmshift_json(lab, "vm", "migrate", VM, "--datastore", "local-host-2", timeout=600))
    assert m["status"] == "completed", m.get("error")
    assert not shared.exists(), "the VM's folder moved"
    capped(local)
    wait_for("the log to go on at the new home",
             lambda: (n := last_flood_line(serial(lab, 2))) > after_vmotion and n, timeout=30)
    moves_took = time.monotonic() - flooding_since
    assert guest_check(lab, VM)["echo"]

    peak = 0

    def done() -> re.Match[str] | None:
        nonlocal peak
        peak = max(peak, capped(local))
        return DONE.search(serial(lab, 2, 4096))

    found = wait_for("the guest to end its flood", done, timeout=FLOOD_S + 180, interval=1.0)
    lines = int(found.group(1))
    written = lines * len("vmshift-flood 1 " + "." * 96 + "\n")  # at least: each line has its number
    print(f"\nthe guest wrote {lines} lines (> {written / 2**20:.1f} MiB) in {FLOOD_S} s; "
          f"the log held at most {peak} bytes (cap {CAP}); the restart and the moves took "
          f"{moves_took:.0f} s of the flood, which ended {time.monotonic() - flooding_since:.0f} s after "
          "its first line was seen")
    assert written > 8 * CAP, f"the guest wrote only {written} bytes"  # 3 MiB at load 17 on 2 cores
    assert (local / "serial.log.1").exists(), "the log rotated"
    assert f"vmshift-flood {lines} " in serial(lab, 2, 8192), "the guest's last lines are in the log"
    assert os.stat(local / "serial.log").st_uid == 0


def test_files_made_by_moves_and_suspend_are_qemus(lab: LabHandle, vm: dict[str, Any]) -> None:
    """Runs after the flood test moved the VM: the Storage vMotion's new disk, then a suspend's state
    file (QEMU writes it into a file the agent created for it) and the resume that reads it."""
    user = pwd.getpwnam(QEMU_USER)
    local = layout(lab).local_datastore(2) / VM
    assert mode_owner(local) == (0o710, 0, user.pw_gid)
    disks = list(local.glob("*.qcow2"))
    assert disks and all(mode_owner(d) == (0o600, user.pw_uid, user.pw_gid) for d in disks)

    vmshift_json(lab, "vm", "suspend", VM, timeout=300)
    assert mode_owner(local / "suspended.state") == (0o600, user.pw_uid, user.pw_gid)
    assert qemu_pids(vm["uuid"]) == []
    resumed = vmshift_json(lab, "vm", "start", VM, timeout=300)
    assert resumed["power_state"] == "poweredOn", resumed
    pids = qemu_pids(vm["uuid"])
    assert len(pids) == 1 and set(psutil.Process(pids[0]).uids()) == {user.pw_uid}
    assert guest_check(lab, VM)["echo"]
