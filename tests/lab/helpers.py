"""Helpers for lab tests: run the CLI, find what a lab left behind, wait for guests."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from vmshift.lab.layout import load_record
from vmshift.tls.contexts import client_context

BIN = Path(sys.executable).parent
T = TypeVar("T")


@dataclass
class LabHandle:
    name: str
    server: str
    token: str
    ca_file: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return Path(f"/var/lib/vmshift/labs/{self.name}")

    def tls(self) -> ssl.SSLContext:
        """Verifies the lab's server (httpx ``verify=``): the CA it made on its first start."""
        return client_context(Path(self.ca_file))


def vmshift(lab: LabHandle, *args: str, check: bool = True, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(BIN / "vmshift"), *args], env=env or lab.env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        cmd = " ".join(args)
        raise AssertionError(f"vmshift {cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def vmshift_json(lab: LabHandle, *args: str, timeout: float = 300) -> Any:
    return json.loads(vmshift(lab, *args, "--json", timeout=timeout).stdout)


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 120, interval: float = 0.5) -> T:
    """Poll a condition until it returns something truthy; fail with `what` on timeout."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
        except Exception as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last error: {last!r}")


def guest_check(lab: LabHandle, vm: str, timeout: float = 180) -> dict[str, Any]:
    """`vmshift lab check VM --json`, retried until the guest answers."""

    def once() -> dict[str, Any] | None:
        proc = vmshift(lab, "lab", "check", vm, "--name", lab.name, "--json", check=False, timeout=60)
        if proc.returncode != 0:
            raise AssertionError(proc.stderr.strip() or proc.stdout.strip())
        data: dict[str, Any] = json.loads(proc.stdout)
        return data if data.get("echo") else None

    return wait_for(f"guest {vm} to answer lab check", once, timeout=timeout, interval=1.0)


def qemu_pids(uuid: str) -> list[int]:
    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if cmd and "qemu-system" in cmd[0] and any(uuid in a for a in cmd):
            pids.append(p.info["pid"])
    return pids


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def namespaces_of(name: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"vms-{name}-")]


def mounts_of(name: str) -> list[str]:
    text = Path("/proc/mounts").read_text()
    return [line for line in text.splitlines() if f"labs/{name}" in line or f"vms-{name}-" in line]


def lab_processes(name: str) -> list[str]:
    marks = (f"labs/{name}/", f"vms-{name}-", f"/run/vmshift/{name}-")
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if any(m in cmd for m in marks):
            found.append(f"{p.info['pid']}: {cmd[:120]}")
    return found


@contextmanager
def running_lab(name: str, hosts: int, config_dir: Path, *up_args: str) -> Iterator[LabHandle]:
    """`vmshift lab up` with ``hosts`` hosts (and ``up_args``, e.g. ``--iscsi``); on exit `lab down`,
    and proof that nothing is left."""
    if os.geteuid() != 0:
        raise AssertionError("The lab tests need root (network namespaces, taps, QEMU): run them as root.")
    env = {**os.environ, "VMSHIFT_CONFIG_DIR": str(config_dir)}
    links_before = root_links()
    up = subprocess.run(
        [str(BIN / "vmshift"), "lab", "up", "--name", name, "--hosts", str(hosts), *up_args],
        env=env, capture_output=True, text=True, timeout=900,
    )
    own: str | None = None  # the prefix of this lab's links in the root namespace (they hold its index)
    try:
        assert up.returncode == 0, f"lab up failed:\n{up.stdout}\n{up.stderr}"
        rec = load_record(name)
        own = rec.layout.root_veth.removesuffix("mgmt") if rec is not None else None
        out = subprocess.run(
            [str(BIN / "vmshift"), "lab", "env", "--name", name],
            env=env, capture_output=True, text=True, check=True,
        ).stdout
        values = dict(
            line.removeprefix("export ").split("=", 1) for line in out.split() if "=" in line
        )
        server = values["VMSHIFT_SERVER"].strip("'\"")
        token = values["VMSHIFT_TOKEN"].strip("'\"")
        ca_file = values["VMSHIFT_CA_FILE"].strip("'\"")
        yield LabHandle(name=name, server=server, token=token, ca_file=ca_file, env={
            **env, "VMSHIFT_SERVER": server, "VMSHIFT_TOKEN": token, "VMSHIFT_CA_FILE": ca_file,
        })
    finally:
        down = subprocess.run(
            [str(BIN / "vmshift"), "lab", "down", "--name", name],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert down.returncode == 0, f"lab down failed:\n{down.stdout}\n{down.stderr}"
        # lab down leaves nothing behind
        assert namespaces_of(name) == [], "namespaces left behind"
        # another lab (another user's) may come or go meanwhile: judge this lab's links only
        left = root_links() - links_before
        assert not (left if own is None else {n for n in left if n.startswith(own)}), \
            f"links left behind in the root namespace: {sorted(left)}"
        assert mounts_of(name) == [], "mounts left behind"
        assert lab_processes(name) == [], "processes left behind"
        assert not Path(f"/var/lib/vmshift/labs/{name}").exists(), "lab state left behind"
