"""Bring a lab up and down: topology, guest image, server, agents, registration, CLI context.

`up` records every step in lab.json before taking it, so `down` (also called by `up` itself on
any failure) finds and removes whatever exists, whichever step failed.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from vmshift.agent.config import DEFAULT_QEMU_USER
from vmshift.errors import ConflictError, LabError, VmshiftError
from vmshift.lab import context, processes, storage, topology
from vmshift.lab.layout import LABS_ROOT, LabRecord, list_records, load_record, validate_name

Progress = Callable[[str], None]
PROBE_TIMEOUT_S = 60.0


def _quiet(_: str) -> None:
    return None


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("vmshift lab needs root: run it with sudo.", hint="Example: sudo vmshift lab up")


def get(name: str) -> LabRecord:
    rec = load_record(validate_name(name))
    if rec is None:
        raise LabError(f"There is no lab named {name!r}.", hint="Start one with 'sudo vmshift lab up'.")
    return rec


def labs() -> list[LabRecord]:
    return list_records()


# ---------------------------------------------------------------- up


def up(
    name: str = "lab", hosts: int = 2, migration_link_rate: str | None = None, progress: Progress = _quiet,
    iscsi: bool = False,
) -> LabRecord:
    """Build the lab and start everything; on failure tear it all down again and raise."""
    require_root()
    validate_name(name)
    if migration_link_rate:
        topology.rate_bits_per_second(migration_link_rate)  # reject a bad rate before building anything
    if load_record(name) is not None:
        raise ConflictError(
            f"A lab named {name!r} is already up.", hint=f"Run 'vmshift lab down --name {name}'."
        )
    rec = topology.reserve(name, hosts)
    rec.migration_link_rate = migration_link_rate
    rec.iscsi = iscsi
    rec.save()
    try:
        _bring_up(rec, progress)
    except BaseException as e:
        progress("failed: tearing down what was built")
        kept = _keep_logs(rec)
        down(name)
        if isinstance(e, VmshiftError):
            hint = (e.hint or "").replace(str(rec.layout.lab_dir / "logs"), str(kept))
            raise type(e)(e.message, hint=hint or None) from e
        if not isinstance(e, Exception):
            raise
        raise LabError(f"Bringing up lab {name!r} failed: {e}.", hint=f"Logs are kept in {kept}.") from e
    return rec


def _keep_logs(rec: LabRecord) -> Path:
    """Move the logs of a failed `up` out of the lab dir (which `down` deletes)."""
    kept = LABS_ROOT.parent / "failed-lab-logs" / rec.name
    shutil.rmtree(kept, ignore_errors=True)
    logs = rec.layout.lab_dir / "logs"
    if logs.is_dir():
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(logs, kept)
    return kept


def _bring_up(rec: LabRecord, progress: Progress) -> None:
    lay = rec.layout
    progress(f"network: namespaces, bridges and veths (lab index {lay.index})")
    topology.build(lay, rec.migration_link_rate)
    progress("datastores, tokens and agent configs")
    processes.prepare_files(rec)
    ensure_qemu_user(progress)
    progress("guest image")
    from vmshift.lab import debian_image, disk_image, image  # lazily: building pulls in a toolchain

    images_dir = image.build_image(progress=lambda msg: progress(f"guest image: {msg}")).parent
    disk_image.build_disk_image(images_dir, progress=lambda msg: progress(f"disk image: {msg}"))
    # like a content library: the images are on every datastore, shared or local
    iscsi_folders = [lay.iscsi_datastore(k) for k in lay.host_numbers] if lay.iscsi else []
    for datastore in (lay.shared_datastore, *(lay.local_datastore(k) for k in lay.host_numbers)):
        image.install_image(images_dir, datastore)
        disk_image.install_disk_image(images_dir, datastore)
    debian_image.install_debian_image(images_dir, lay.shared_datastore)  # if built (--kind debian)
    for folder in iscsi_folders:  # the kernel image only: a disk image cannot back a LUN yet
        image.install_image(images_dir, folder)
    if lay.iscsi:
        progress("storage box: tgtd and the storage role")
        storage.start(rec)
    progress("server")
    processes.start_server(rec)
    for k in lay.host_numbers:
        progress(f"agent of host-{k}")
        processes.start_agent(rec, k)
    progress("registering hosts and the VM network's IP pool")
    _register(rec)
    rec.state = "up"
    rec.save()
    context.save_context(rec.server_url or "", rec.token or "", rec.name, str(rec.ca_file))


def _register(rec: LabRecord) -> None:
    lay = rec.layout
    headers = {"Authorization": f"Bearer {rec.token}"}
    with httpx.Client(
        base_url=f"{rec.server_url}/api/v1", headers=headers, trust_env=False, timeout=60,
        verify=rec.server_tls(),
    ) as http:
        for k in lay.host_numbers:
            # the lab reads the agent's bootstrap fingerprint from its file: what an operator
            # compares with `vmshift-agent --config FILE fingerprint` on the host
            body = {"address": lay.agent_address(k), "fingerprint": processes.agent_fingerprint(lay, k)}
            r = http.post("/hosts", json=body)
            _expect(r, f"Registering host-{k} ({lay.agent_address(k)})")
            rec.host_names[str(k)] = str(r.json().get("name", f"host-{k}"))
        pool = {"cidr": lay.vm_cidr, "first": lay.pool_first, "last": lay.pool_last}
        r = http.put(f"/networks/{quote('VM Network', safe='')}/ip-pool", json=pool)
        _expect(r, "Setting the IP pool of 'VM Network'")
    rec.save()


def _expect(r: httpx.Response, what: str) -> None:
    if r.status_code < 300:
        return
    try:
        err = r.json()["error"]
        detail = f"{err.get('message')} {err.get('hint') or ''}".strip()
    except (ValueError, KeyError, TypeError):
        detail = r.text[:300]
    raise LabError(f"{what} failed with HTTP {r.status_code}: {detail}")


def ensure_qemu_user(progress: Progress = _quiet) -> None:
    """Create the system user the agents run QEMU as, like scripts/install-system.sh does on a real
    host (docs/confinement.md); an agent without it runs QEMU as root."""
    try:
        pwd.getpwnam(DEFAULT_QEMU_USER)
        return
    except KeyError:
        pass
    progress(f"creating the system user {DEFAULT_QEMU_USER} for QEMU")
    proc = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", DEFAULT_QEMU_USER],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode not in (0, 9):  # 9: it exists (another lab created it just now)
        raise LabError(f"Could not create the user {DEFAULT_QEMU_USER}: {proc.stderr.strip()}",
                       hint="Create it by hand: useradd --system --no-create-home --shell /usr/sbin/nologin "
                            f"{DEFAULT_QEMU_USER}")


# ---------------------------------------------------------------- down


def down(name: str = "lab") -> list[str]:
    """Stop every process of the lab, delete its network and state; returns what could not be removed."""
    require_root()
    validate_name(name)
    rec = load_record(name)
    owns_root_link = True
    if rec is None:
        hosts = _guess_hosts(name)
        index = _guess_index(name)
        # With an unknown index, deleting the switch namespace still removes our root leg (veth peer).
        owns_root_link = index is not None
        rec = LabRecord(name=name, index=index or 0, hosts=hosts) if hosts else None
    problems: list[str] = []
    if rec is not None:
        lay = rec.layout
        storage.stop(rec)  # first: tgtd ignores the SIGTERM the namespaces' leftovers get
        processes.stop_all(rec)
        problems += topology.teardown(lay, remove_root_link=owns_root_link)
        for k in lay.host_numbers:
            shutil.rmtree(lay.agent_state_dir(k), ignore_errors=True)
        shutil.rmtree(lay.lab_dir, ignore_errors=True)
        if lay.lab_dir.exists():
            problems.append(f"Could not remove {lay.lab_dir}.")
    context.clear_context(name)
    return problems


def _guess_hosts(name: str) -> int:
    """Hosts of a lab whose lab.json is gone, from its leftover namespaces (0 if none)."""
    prefix = f"vms-{name}-host-"
    ks = [
        int(p.name[len(prefix) :])
        for p in topology.NETNS_DIR.glob(f"{prefix}*")
        if p.name[len(prefix) :].isdigit()
    ]
    switch = (topology.NETNS_DIR / f"vms-{name}-switch").exists()
    return max(ks, default=1 if switch else 0)


def _guess_index(name: str) -> int | None:
    """Index of a recordless lab, from the root leg its switch namespace holds (None if unknown)."""
    ns = f"vms-{name}-switch"
    if not topology.ns_exists(ns):
        return None
    out = topology.run(["ip", "-n", ns, "-j", "link", "show", "root-mgmt"], check=False)
    try:
        peer_ifindex = json.loads(out)[0]["link_index"]
    except (ValueError, LookupError, TypeError):
        return None
    for i in range(64):
        idx = Path(f"/sys/class/net/vmslab{i}-mgmt/ifindex")
        if idx.exists() and int(idx.read_text()) == peer_ifindex:
            return i
    return None


# ---------------------------------------------------------------- env, check, probe


def env(name: str = "lab") -> str:
    rec = get(name)
    return (f"export VMSHIFT_SERVER={rec.server_url}\nexport VMSHIFT_TOKEN={rec.token}\n"
            f"export VMSHIFT_CA_FILE={shlex.quote(str(rec.ca_file))}\n")


def vm_ip(rec: LabRecord, vm: str) -> str:
    """The VM's IP address, as the lab's server knows it."""
    headers = {"Authorization": f"Bearer {rec.token}"}
    try:
        r = httpx.get(
            f"{rec.server_url}/api/v1/vms/{quote(vm, safe='')}", headers=headers, trust_env=False, timeout=10,
            verify=rec.server_tls(),
        )
    except httpx.HTTPError as e:
        raise LabError(
            f"The server of lab {rec.name!r} did not answer: {e}.",
            hint=f"See {rec.layout.log_file('server')}.",
        ) from e
    _expect(r, f"Looking up VM {vm!r}")
    ip = r.json().get("ip")
    if not ip:
        raise LabError(
            f"VM {vm!r} has no IP address.", hint="Create it on 'VM Network' in a lab (the pool sets one)."
        )
    return str(ip)


def run_probe(rec: LabRecord, args: list[str], timeout: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """Run `python -m vmshift.lab.probe ARGS` inside the lab's client namespace and parse its JSON."""
    cmd = ["ip", "netns", "exec", rec.layout.client_ns, sys.executable, "-m", "vmshift.lab.probe", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise LabError(f"The probe '{' '.join(args)}' did not finish within {timeout:.0f} s.") from e
    try:
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as e:
        raise LabError(f"The probe '{' '.join(args)}' failed: {proc.stderr.strip()[-500:]}") from e
    return result


def check(name: str, vm: str, wait_s: float = 0.0) -> dict[str, Any]:
    """Echo + guest integrity status of vm, seen from the lab's client namespace.

    With `wait_s`, a guest that does not answer yet (still booting) is asked again until it does
    or the time is up; the last answer is returned either way.
    """
    require_root()
    rec = get(name)
    ip = vm_ip(rec, vm)
    deadline = time.monotonic() + wait_s
    while True:
        result = run_probe(rec, ["check", ip])
        if (result.get("echo") and "error" not in result) or time.monotonic() >= deadline:
            return result
        time.sleep(1.0)


MEMTEST_PAGE_BYTES = 4096  # the guest's memtest page (lab/guest/memtest.c PAGE_BYTES)


def memtest_swept_since(start: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether memtest has verified every page of its buffer since the answer ``start`` (both are
    the guest's ``check`` answers' ``memtest``): with one thread it sweeps the buffer in a cycle, so
    any run of as many page checks as the buffer has pages covers each page once, whichever page
    it started at; with several threads (each on its own slice, at its own pace) only two more
    completed passes prove it."""
    if int(now.get("mismatches", 0)) > 0:
        return True  # decided: the caller sees the mismatch
    if int(start.get("threads", 1)) == 1 and int(now.get("threads", 1)) == 1:
        pages = int(start["size_mib"]) * (1 << 20) // MEMTEST_PAGE_BYTES
        return int(now["pages"]) - int(start["pages"]) >= pages
    return int(now["passes"]) >= int(start["passes"]) + 2


def wait_memtest_passes(name: str, vm: str, passes: int, timeout_s: float = 120.0) -> dict[str, Any]:
    """Ask the guest (as `check` does) until memtest has completed `passes` sweeps; its answer.

    memtest verifies a page only when its sweep reaches it, so judging memory after a migration means
    waiting for full passes. The guest has no way to push its status, hence the polling.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        answer = check(name, vm, wait_s=60)
        if answer.get("echo") and (answer.get("memtest") or {}).get("passes", 0) >= passes:
            return answer
        if time.monotonic() > deadline:
            raise LabError(f"memtest in {vm} did not reach {passes} passes within {timeout_s:.0f} s: "
                           f"{answer}", hint="Is the guest booted with vmshift.memtest=SIZE,RATE?")
        time.sleep(1.0)


def probe(name: str, vm: str, seconds: float = 5.0) -> dict[str, Any]:
    """A 1 ms UDP echo probe of vm for `seconds`: sent, lost, longest gap between replies."""
    require_root()
    rec = get(name)
    return run_probe(
        rec, ["udp", vm_ip(rec, vm), "--seconds", str(seconds)], timeout=seconds + PROBE_TIMEOUT_S
    )
