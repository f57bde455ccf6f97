"""Start, watch and stop a lab's server (root namespace) and agents (one per host namespace).

Processes run detached in their own session with logs under the lab dir; their pids are kept in
lab.json. Helpers to kill and restart them exist for fault-injection tests.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil

from vmshift.client.agent import AgentCredentials
from vmshift.errors import LabError
from vmshift.lab import topology
from vmshift.lab.layout import LabLayout, LabRecord, load_record
from vmshift.tls import pki
from vmshift.tls.contexts import client_context, unverified_context
from vmshift.tls.files import HostTlsFiles, ServerTlsFiles

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
DATASTORE_MARKER = ".vmshift-datastore.json"


def bin_dir() -> Path:
    """The directory of the running interpreter's console scripts (the virtualenv's bin)."""
    return Path(sys.executable).parent


def _resolve(lab: LabRecord | str) -> LabRecord:
    if isinstance(lab, LabRecord):
        return lab
    rec = load_record(lab)
    if rec is None:
        raise LabError(f"There is no lab named {lab!r}.", hint="Start one with 'sudo vmshift lab up'.")
    return rec


def host_number(host: int | str) -> int:
    """1 for 1, "1" or "host-1"."""
    text = str(host).removeprefix("host-")
    if not text.isdigit():
        raise LabError(f"{host!r} is not a lab host.", hint="Name hosts host-1, host-2, ... or 1, 2, ...")
    return int(text)


def token_file(lay: LabLayout) -> Path:
    """The user's API token (agents take no token: mutual TLS, docs/agent-tls.md)."""
    return lay.lab_dir / "user-token"


def server_tls(lay: LabLayout) -> ServerTlsFiles:
    """The lab server's CA and certificate (the server makes them on its first start)."""
    return ServerTlsFiles.of(lay.server_dir)


def agent_credentials(lay: LabLayout) -> AgentCredentials:
    """Call the lab's agents as its server does (tests and benches talk to agents directly)."""
    return AgentCredentials.of_server(lay.server_dir)


def agent_http(lay: LabLayout, k: int, timeout: float = 60.0) -> httpx.Client:
    """An HTTP client of host-k's agent API as the server reaches it (its certificate, verified)."""
    ssl_context = agent_credentials(lay).ssl
    return httpx.Client(base_url=f"https://{lay.agent_address(k)}/api/v1", trust_env=False, timeout=timeout,
                        verify=ssl_context if ssl_context is not None else True)


def agent_fingerprint(lay: LabLayout, k: int) -> str:
    """The bootstrap certificate host-k's agent made on its first start (what `host add` confirms)."""
    return pki.fingerprint(HostTlsFiles.of(lay.agent_state_dir(k)).bootstrap_cert.read_bytes())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_secret(path: Path, content: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(content)


def _make_datastore(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    marker = path / DATASTORE_MARKER
    if not marker.exists():
        marker.write_text(json.dumps({"uuid": str(uuid.uuid4()), "name": path.name}) + "\n")


def prepare_files(rec: LabRecord) -> None:
    """Tokens, datastores (with their UUID markers) and one agent config per host."""
    lay = rec.layout
    (lay.lab_dir / "logs").mkdir(parents=True, exist_ok=True)
    user_tok = token_file(lay)
    if not user_tok.exists():
        _write_secret(user_tok, secrets.token_urlsafe(32))
    rec.token = user_tok.read_text().strip()
    _make_datastore(lay.shared_datastore)
    if lay.iscsi:
        from vmshift.lab import storage

        storage.prepare_files(lay)
    for k in lay.host_numbers:
        _make_datastore(lay.local_datastore(k))
        config: dict[str, Any] = {
            "name": f"host-{k}",
            "listen": lay.agent_address(k),
            "state_dir": str(lay.agent_state_dir(k)),
            "ca_file": str(server_tls(lay).ca_cert),
            "datastores": [str(lay.shared_datastore), str(lay.local_datastore(k))],
            "networks": {"VM Network": "br0"},
            "management_address": lay.host_mgmt_address(k),
            "migration_address": lay.host_mig_address(k),
            "accelerator": "auto",
            "registered_datastores_dir": str(lay.datastores_dir / f"registered-host-{k}"),
        }
        if lay.iscsi:
            from vmshift.lab import storage  # it builds on this module

            iscsi_settings = storage.agent_settings(lay, k)
            config["datastores"] = [*config["datastores"], iscsi_settings["datastore"]]
            config["storage_role_tokens"] = iscsi_settings["storage_role_tokens"]
        lay.agent_config(k).write_text(json.dumps(config, indent=2) + "\n")
    rec.save()


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "ab") as out:
        try:
            return subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True, env=env,
            )  # fmt: skip
        except OSError as e:
            raise LabError(
                f"Could not start {args[0]}: {e}.", hint="Is vmshift installed in this venv?"
            ) from e


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_http(
    url: str, token: str | None, proc: subprocess.Popen[bytes] | None, log: Path, what: str,
    timeout: float = START_TIMEOUT_S, verify: ssl.SSLContext | Path | None = None,
) -> None:  # fmt: skip
    """Poll url until it answers 200; fail early if the process exits, clearly if the time runs out.

    ``verify`` checks an https URL's certificate: an SSL context, or a CA file the process makes on
    its first start (polled for until it appears). ``token`` None: send none (agents: ``verify``
    presents the server's certificate instead)."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    http: httpx.Client | None = None
    try:
        while True:
            if proc is not None and proc.poll() is not None:
                raise LabError(
                    f"The {what} exited with status {proc.returncode} while starting.",
                    hint=f"See its log {log}:\n{log_tail(log)}",
                )
            if http is None:
                http = _poll_client(verify)
                if http is None:
                    last = f"its CA {verify} does not exist yet"
            if http is not None:
                try:
                    r = http.get(url, headers=headers)
                    if r.status_code == 200:
                        return
                    last = f"HTTP {r.status_code}: {r.text[:300]}"
                    if 400 <= r.status_code < 500:  # a wrong token or a broken route does not heal by waiting
                        raise LabError(
                            f"The {what} answered {url} with {last}.",
                            hint=f"See its log {log}:\n{log_tail(log)}",
                        )
                except httpx.HTTPError as e:
                    last = type(e).__name__
                    if isinstance(e, httpx.ConnectError) and "CERTIFICATE_VERIFY_FAILED" in str(e):
                        last = f"its certificate does not verify: {e}"
            if time.monotonic() > deadline:
                raise LabError(
                    f"The {what} did not answer {url} within {timeout:.0f} s ({last}).",
                    hint=f"See its log {log}:\n{log_tail(log)}",
                )
            time.sleep(0.2)
    finally:
        if http is not None:
            http.close()


def _poll_client(verify: ssl.SSLContext | Path | None) -> httpx.Client | None:
    """An httpx client for wait_http; None while the CA file ``verify`` names is still missing."""
    if isinstance(verify, Path):
        if not verify.exists():
            return None
        verify = client_context(verify)
    return httpx.Client(trust_env=False, timeout=2.0, verify=verify if verify is not None else True)


# ---------------------------------------------------------------- server


def start_server(lab: LabRecord | str, timeout: float = START_TIMEOUT_S) -> None:
    rec = _resolve(lab)
    lay = rec.layout
    user_tok = token_file(lay)
    if rec.server_url is None or rec.server_url.startswith("http://"):  # a lab.json from before TLS
        rec.server_url = f"https://127.0.0.1:{free_port()}"
    listen = rec.server_url.removeprefix("https://")
    lay.server_dir.mkdir(parents=True, exist_ok=True)
    log = lay.log_file("server")
    proc = spawn(
        [str(bin_dir() / "vmshift-server"), "--listen", listen, "--state-dir", str(lay.server_dir),
         "--token-file", str(user_tok)],
        log,
    )  # fmt: skip
    rec.pids["server"] = proc.pid
    rec.save()
    wait_http(f"{rec.server_url}/api/v1/about", rec.token or "", proc, log, "vmshift server", timeout,
              verify=rec.ca_file)


def stop_server(lab: LabRecord | str) -> None:
    rec = _resolve(lab)
    stop_pid(rec.pids.pop("server", None), marker=str(rec.layout.server_dir))
    rec.save()


def restart_server(lab: LabRecord | str) -> None:
    rec = _resolve(lab)
    stop_server(rec)
    start_server(rec)


# ---------------------------------------------------------------- agents


def start_agent(lab: LabRecord | str, host: int | str, timeout: float = START_TIMEOUT_S) -> None:
    rec = _resolve(lab)
    lay = rec.layout
    host = host_number(host)
    log = lay.log_file(f"host-{host}")
    config = lay.agent_config(host)
    proc = spawn(
        ["ip", "netns", "exec", lay.host_ns(host), str(bin_dir() / "vmshift-agent"), "--config", str(config)],
        log,
    )
    rec.pids[f"host-{host}"] = proc.pid
    rec.save()
    # before `host add` the agent serves its bootstrap certificate: readiness only, no trust
    tls = server_tls(lay)
    url = f"https://{lay.agent_address(host)}/api/v1/health"
    wait_http(url, None, proc, log, f"agent of host-{host}", timeout,
              verify=unverified_context(cert=tls.cert, key=tls.key))


def kill_agent(lab: LabRecord | str, host: int | str, sig: int = signal.SIGKILL) -> None:
    """Send sig to host's agent (its QEMU processes live on: they run in their own session)."""
    rec = _resolve(lab)
    host = host_number(host)
    pid = rec.pids.get(f"host-{host}")
    if pid is None or not _is_ours(pid, str(rec.layout.agent_config(host))):
        raise LabError(f"The agent of host-{host} in lab {rec.name!r} is not running.")
    os.kill(pid, sig)
    if sig in (signal.SIGKILL, signal.SIGTERM):
        wait_ended([psutil.Process(pid)], STOP_TIMEOUT_S)


def stop_agent(lab: LabRecord | str, host: int | str) -> None:
    rec = _resolve(lab)
    host = host_number(host)
    stop_pid(rec.pids.pop(f"host-{host}", None), marker=str(rec.layout.agent_config(host)))
    rec.save()


def agent_running(lab: LabRecord | str, host: int | str) -> bool:
    rec = _resolve(lab)
    host = host_number(host)
    pid = rec.pids.get(f"host-{host}")
    return pid is not None and _is_ours(pid, str(rec.layout.agent_config(host)))


def ensure_agent(lab: LabRecord | str, host: int | str) -> None:
    """Start host's agent unless it already runs (tests use it to undo injected faults)."""
    if not agent_running(lab, host):
        start_agent(lab, host)


def restart_agent(lab: LabRecord | str, host: int | str) -> None:
    rec = _resolve(lab)
    stop_agent(rec, host)
    start_agent(rec, host)


# ---------------------------------------------------------------- stopping


def _is_ours(pid: int, marker: str) -> bool:
    """True if pid is alive and its command line mentions marker (guards against pid reuse)."""
    try:
        return any(marker in part for part in psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def stop_pid(pid: int | None, marker: str) -> None:
    if pid is not None and _is_ours(pid, marker):
        terminate([pid])


def _exited(p: psutil.Process) -> bool:
    """Gone, or a zombie: it ended, and only its parent can reap it."""
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def wait_ended(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until each process has exited; returns those still running after ``timeout``.

    ``psutil.wait_procs`` alone counts a zombie as alive. A process of the lab that another process
    started (a test restarting an agent, say) stays a zombie after it exited until that parent reaps
    it, so waiting for it to vanish used the whole timeout: `lab down` took 20 s per restarted
    process. Our own children are reaped here; a zombie of anyone else counts as ended.
    """
    deadline = time.monotonic() + timeout
    alive = procs
    while True:
        _, alive = psutil.wait_procs(alive, timeout=0.05)
        alive = [p for p in alive if not _exited(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def terminate(pids: list[int], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, wait, then SIGKILL whatever is left."""
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            p.terminate()
            procs.append(p)
        except psutil.Error:
            continue
    alive = wait_ended(procs, timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            continue
    wait_ended(alive, timeout)


def qemu_pids(lay: LabLayout) -> list[int]:
    """QEMU processes of the lab: by pid files in the agents' state dirs and by host namespace."""
    pids: set[int] = set()
    for k in lay.host_numbers:
        state = lay.agent_state_dir(k)
        if state.is_dir():
            for f in state.glob("vms/*/*pid*"):
                try:
                    pids.add(int(f.read_text().split()[0]))
                except (OSError, ValueError, IndexError):
                    continue
        pids.update(topology.namespace_pids(lay.host_ns(k)))
    found = []
    for pid in pids:
        try:
            if "qemu" in psutil.Process(pid).name():
                found.append(pid)
        except psutil.Error:
            continue
    return found


def stop_all(rec: LabRecord) -> None:
    """Stop the server (so nothing reacts to the rest), agents, QEMU, then anything left in the namespaces."""
    lay = rec.layout
    stop_pid(rec.pids.pop("server", None), marker=str(lay.server_dir))
    for k in lay.host_numbers:
        stop_pid(rec.pids.pop(f"host-{k}", None), marker=str(lay.agent_config(k)))
    terminate(qemu_pids(lay))
    leftovers = [pid for ns in lay.namespaces for pid in topology.namespace_pids(ns)]
    terminate([p for p in leftovers if p != os.getpid()])
