"""The storage box of a lab with ``--iscsi``: tgtd and the storage role in their own namespace on
the storage network, and the datastore ``iscsi-1`` that every host sees through it.

tgtd listens on the storage box's address only (``--iscsi portal=``); its control socket
(``/var/run/tgtd/socket.N``, N = lab.tgt_control_port) is per lab. Helpers to pause, resume and kill
tgtd exist for the fault tests.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

from vmshift.agent.tgt import parse_show
from vmshift.errors import LabError
from vmshift.lab import layout as L
from vmshift.lab.layout import LabLayout, LabRecord
from vmshift.lab.processes import DATASTORE_MARKER, START_TIMEOUT_S, log_tail, spawn, terminate
from vmshift.model import iscsi

TGT_SOCKET_DIR = Path("/var/run/tgtd")


def target_iqn(lay: LabLayout) -> str:
    return iscsi.datastore_target(L.ISCSI_DATASTORE, qualifier=lay.name)


def role_url(lay: LabLayout) -> str:
    return f"http://{lay.storage_address}:{iscsi.STORAGE_ROLE_PORT}"


def token_file(lay: LabLayout) -> Path:
    return lay.lab_dir / "storage-role-token"


def role_config(lay: LabLayout) -> Path:
    return lay.lab_dir / "storage-role.json"


def prepare_files(lay: LabLayout) -> None:
    """The storage role's config and token, and iscsi-1's marker in each host's folder of it (one
    UUID: the same datastore, reached through the same target)."""
    lay.storage_dir.mkdir(parents=True, exist_ok=True)
    tok = token_file(lay)
    if not tok.exists():
        fd = os.open(tok, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    role_config(lay).write_text(json.dumps({
        "listen": f"{lay.storage_address}:{iscsi.STORAGE_ROLE_PORT}", "portal": lay.iscsi_portal,
        "target": target_iqn(lay), "state_dir": str(lay.storage_dir), "token_file": str(tok),
        "tgt_control_port": lay.tgt_control_port,
    }, indent=2) + "\n")
    marker = {"uuid": str(uuid.uuid4()), "name": L.ISCSI_DATASTORE, "type": "iscsi",
              "portal": lay.iscsi_portal, "target": target_iqn(lay), "storage_role": role_url(lay)}
    for k in lay.host_numbers:
        folder = lay.iscsi_datastore(k)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / DATASTORE_MARKER).write_text(json.dumps(marker) + "\n")


def agent_settings(lay: LabLayout, k: int) -> dict[str, object]:
    """What host k's agent config gains: its folder of iscsi-1 and the storage role's token."""
    return {"datastore": str(lay.iscsi_datastore(k)),
            "storage_role_tokens": {L.ISCSI_DATASTORE: str(token_file(lay))}}


def _in_storage(lay: LabLayout, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", lay.storage_ns, *argv]


def _tgt_ready(lay: LabLayout) -> bool:
    proc = subprocess.run(_in_storage(lay, "tgtadm", "-C", str(lay.tgt_control_port), "--op", "show",
                                      "--mode", "sys"), capture_output=True, check=False, timeout=10)
    return proc.returncode == 0


def start_tgtd(rec: LabRecord, timeout: float = START_TIMEOUT_S) -> None:
    lay = rec.layout
    log = lay.log_file("tgtd")
    proc = spawn(_in_storage(lay, "tgtd", "-f", "-C", str(lay.tgt_control_port), "--iscsi",
                              f"portal={lay.iscsi_portal}"), log)
    rec.pids["tgtd"] = proc.pid
    rec.save()
    deadline = time.monotonic() + timeout
    while not _tgt_ready(lay):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LabError("tgtd did not start in the storage namespace.",
                           hint=f"See {log}:\n{log_tail(log)}")
        time.sleep(0.1)


_WAIT_ROLE = """
import sys, time, httpx
url, token, deadline = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    try:
        if httpx.get(url, headers={"Authorization": f"Bearer {token}"}, trust_env=False).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(0.2)
sys.exit(1)
"""


def start_role(rec: LabRecord, timeout: float = START_TIMEOUT_S) -> None:
    """Start the storage role in the storage box and wait until it answers there."""
    lay = rec.layout
    log = lay.log_file("storage-role")
    proc = spawn(_in_storage(lay, sys.executable, "-m", "vmshift.agent.storage_role", "--config",
                              str(role_config(lay))), log)
    rec.pids["storage-role"] = proc.pid
    rec.save()
    token = token_file(lay).read_text().strip()
    probe = _in_storage(lay, sys.executable, "-c", _WAIT_ROLE, f"{role_url(lay)}/api/v1/target", token,
                        str(timeout))
    waited = subprocess.run(probe, capture_output=True, check=False, timeout=timeout + 10)
    if waited.returncode != 0 or proc.poll() is not None:
        raise LabError("The storage role did not start in the storage namespace.",
                       hint=f"See {log}:\n{log_tail(log)}")


def start(rec: LabRecord) -> None:
    start_tgtd(rec)
    start_role(rec)


def tgtd_pid(rec: LabRecord) -> int:
    pid = rec.pids.get("tgtd")
    if pid is None or not psutil.pid_exists(pid):
        raise LabError(f"tgtd of lab {rec.name!r} is not running.")
    return pid


def signal_tgtd(rec: LabRecord, sig: int) -> None:
    """SIGSTOP/SIGCONT to freeze and thaw the target; SIGKILL to take it away for good."""
    pid = tgtd_pid(rec)
    os.kill(pid, sig)
    if sig == signal.SIGKILL:
        psutil.wait_procs([psutil.Process(pid)], timeout=10)


def stop(rec: LabRecord) -> None:
    """The storage role, then tgtd (which ignores SIGTERM while it serves a target: SIGKILL)."""
    lay = rec.layout
    pid = rec.pids.pop("storage-role", None)
    if pid is not None:
        terminate([pid])
    pid = rec.pids.pop("tgtd", None)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
            psutil.wait_procs([psutil.Process(pid)], timeout=10)
        except (ProcessLookupError, psutil.Error):
            pass
    for leftover in TGT_SOCKET_DIR.glob(f"socket.{lay.tgt_control_port}*"):
        leftover.unlink(missing_ok=True)


def restart(rec: LabRecord) -> None:
    """Start tgtd and the storage role again (after a fault test killed tgtd): the role puts its
    LUNs back into the new tgtd."""
    stop(rec)
    start(rec)


def target_luns(rec: LabRecord) -> set[int]:
    """The LUNs tgtd serves now (LUN 0, its controller, left out), read with tgtadm."""
    lay = rec.layout
    show = _in_storage(lay, "tgtadm", "-C", str(lay.tgt_control_port), "--lld", "iscsi", "--op", "show",
                       "--mode", "target")
    out = subprocess.run(show, capture_output=True, text=True, check=True, timeout=10).stdout
    return parse_show(out)[1]
