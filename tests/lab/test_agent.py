"""The host agent against real QEMU, real taps and real HTTP, inside a network namespace.

The agent runs in a namespace ``vmsa-<random>`` holding bridge ``br0``; a veth pair gives the test
(root namespace) an address in 10.213.250.0/24 to reach it. The guest is a tiny busybox initramfs
built here (Debian cloud kernel): it prints a line on serial at boot and, when booted with
``vmsa.acpi=1``, powers off on the ACPI power button.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import pytest

from tests.lab.helpers import wait_for
from vmshift.tls import pki
from vmshift.tls.contexts import unverified_context
from vmshift.tls.files import ServerTlsFiles

pytestmark = pytest.mark.lab

BIN = Path(sys.executable).parent
CACHE = Path("/var/cache/vmshift-agent-test")
IMAGE = "vmsa-tiny"
BOOT_LINE = "vmsa-guest: booted"
T = TypeVar("T")

INIT = """#!/bin/busybox sh
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
echo "vmsa-guest: booted"
if grep -q 'vmsa.acpi=1' /proc/cmdline; then
    insmod /lib/button.ko; insmod /lib/evdev.ko
    # busybox acpid opens the event devices only when it starts.
    n=0; while [ ! -e /dev/input/event0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
    mkdir -p /etc/acpi/PWRF
    printf '#!/bin/sh\\necho "vmsa-guest: power button" >/dev/console\\npoweroff -f\\n' \\
        >/etc/acpi/PWRF/00000080
    chmod 755 /etc/acpi/PWRF/00000080
    mkdir -p /var/log
    acpid -c /etc/acpi -l /var/log/acpid.log || echo "vmsa-guest: acpid failed"
    echo "vmsa-guest: acpi on"
fi
while true; do sleep 1; done
"""
APPLETS = ("sh", "mount", "insmod", "mkdir", "grep", "sleep", "echo", "printf", "chmod", "acpid", "poweroff",
           "run-parts", "ls")


def gone(pid: int) -> bool:
    """The process no longer runs (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def sh(*argv: str, check: bool = True) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout


def build_tiny_image(dest: Path) -> None:
    """Kernel + busybox initramfs into ``dest`` (kernel package cached in CACHE)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    debs = sorted(CACHE.glob("linux-image-*-cloud-amd64_*.deb"))
    if not debs:
        meta = sh("apt-cache", "depends", "linux-image-cloud-amd64")
        package = next(line.split(":", 1)[1].strip() for line in meta.splitlines() if "Depends:" in line)
        subprocess.run(["apt-get", "download", package], cwd=CACHE, check=True, capture_output=True)
        debs = sorted(CACHE.glob("linux-image-*-cloud-amd64_*.deb"))
    kroot = CACHE / "root"
    if not kroot.is_dir():
        sh("dpkg-deb", "-x", str(debs[-1]), str(kroot))
    dest.mkdir(parents=True)
    shutil.copyfile(next((kroot / "boot").glob("vmlinuz-*")), dest / "vmlinuz")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "dev", "proc", "sys", "lib", "etc"):
            (root / d).mkdir()
        for applet in APPLETS:
            (root / "bin" / applet).symlink_to("busybox")
        shutil.copyfile("/bin/busybox", root / "bin" / "busybox")
        (root / "bin" / "busybox").chmod(0o755)
        for mod in ("acpi/button.ko", "input/evdev.ko"):
            shutil.copyfile(next((kroot / "lib/modules").glob(f"*/kernel/drivers/{mod}")),
                            root / "lib" / Path(mod).name)
        (root / "init").write_text(INIT)
        (root / "init").chmod(0o755)
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files,
                              capture_output=True, check=True).stdout
        subprocess.run(["gzip", "-1"], input=cpio, stdout=(dest / "initrd.img").open("wb"), check=True)
    (dest / "image.json").write_text(json.dumps({
        "name": IMAGE, "kind": "kernel", "kernel": "vmlinuz", "initrd": "initrd.img",
        "cmdline": "console=ttyS0 quiet panic=-1",
    }))


@dataclass
class AgentEnv:
    ns: str
    url: str
    server_tls: ServerTlsFiles  # a cluster CA and server identity of this test's own
    config: Path
    workdir: Path
    datastore: Path
    state_dir: Path
    agent: subprocess.Popen[bytes] | None = None
    qemu_pids: set[int] = field(default_factory=set)

    def client(self) -> httpx.Client:
        """As the server calls it: with the server's certificate (the agent serves its bootstrap
        certificate here, never added to a server, so nothing to verify it against)."""
        verify = unverified_context(cert=self.server_tls.cert, key=self.server_tls.key)
        return httpx.Client(base_url=self.url + "/api/v1", timeout=60, verify=verify)

    def start_agent(self) -> None:
        log = (self.workdir / "agent.log").open("ab")
        self.agent = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, str(BIN / "vmshift-agent"), "--config", str(self.config)],
            stdout=log, stderr=log, start_new_session=True)

        def healthy() -> bool:
            assert self.agent is not None and self.agent.poll() is None, (
                f"agent exited: {(self.workdir / 'agent.log').read_text()[-2000:]}")
            with self.client() as c:
                return c.get("/health").status_code == 200

        try:
            wait_for("the agent to answer /health", healthy, timeout=60)
        except AssertionError as exc:
            log_tail = (self.workdir / "agent.log").read_text()[-3000:]
            raise AssertionError(f"{exc}\nagent log:\n{log_tail}") from None

    def kill_agent(self, sig: signal.Signals = signal.SIGKILL) -> int | None:
        code = None
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(sig)
            code = self.agent.wait(timeout=20)
        self.agent = None
        return code

    def ns_links(self) -> str:
        return sh("ip", "netns", "exec", self.ns, "ip", "-o", "link", "show")


@pytest.fixture(scope="module")
def env() -> Iterator[AgentEnv]:
    if os.geteuid() != 0:
        pytest.fail("The agent lab test needs root (namespaces, taps, QEMU).")
    suffix = secrets.token_hex(3)
    ns, veth_root = f"vmsa-{suffix}", f"vsa{suffix}"
    k = secrets.randbelow(60) + 1
    root_ip, ns_ip = f"10.213.250.{4 * k + 1}", f"10.213.250.{4 * k + 2}"
    workdir = Path(tempfile.mkdtemp(prefix="vmsa-"))
    os.chmod(workdir, 0o755)  # a confined QEMU (user vmshift-qemu, if it exists) must reach its datastore
    env = AgentEnv(ns=ns, url=f"https://{ns_ip}:8101", server_tls=ServerTlsFiles.of(workdir / "server"),
                   config=workdir / "agent.json", workdir=workdir,
                   datastore=workdir / "ds1", state_dir=workdir / "st")
    sh("ip", "netns", "add", ns)
    try:
        for cmd in (
            ["ip", "link", "add", veth_root, "type", "veth", "peer", "name", "mgmt0", "netns", ns],
            ["ip", "addr", "add", f"{root_ip}/30", "dev", veth_root],
            ["ip", "link", "set", veth_root, "up"],
            ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/30", "dev", "mgmt0"],
            ["ip", "netns", "exec", ns, "ip", "link", "set", "mgmt0", "up"],
            ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
            ["ip", "netns", "exec", ns, "ip", "link", "add", "br0", "type", "bridge"],
            ["ip", "netns", "exec", ns, "ip", "link", "set", "br0", "up"],
        ):
            sh(*cmd)
        env.datastore.mkdir()
        (env.datastore / ".vmshift-datastore.json").write_text(
            json.dumps({"uuid": str(uuid.uuid4()), "name": "ds1"}))
        build_tiny_image(env.datastore / "images" / IMAGE)
        env.server_tls.ensure([])
        env.config.write_text(json.dumps({
            "name": "host-a", "listen": f"{ns_ip}:8101", "ca_file": str(env.server_tls.ca_cert),
            "state_dir": str(env.state_dir), "datastores": [str(env.datastore)],
            "networks": {"VM Network": "br0"}, "management_address": ns_ip, "accelerator": "auto",
        }))
        env.start_agent()
        yield env
    finally:
        env.kill_agent()
        ours = []
        for pid in env.qemu_pids:  # only processes that still are this test's QEMU (pids get reused)
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if VM_UUID in proc.cmdline():
                    proc.kill()
                    ours.append(proc)
        psutil.wait_procs(ours, timeout=10)
        sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", veth_root, check=False)
        shutil.rmtree(workdir, ignore_errors=True)


def vm_spec(name: str, vm_uuid: str, cmdline: str = "") -> dict[str, Any]:
    return {
        "name": name, "uuid": vm_uuid, "cpus": 1, "memory_mib": 128, "cpu_model": "qemu64",
        "machine_type": "q35", "datastore": "ds1",
        "disks": [{"datastore": "ds1", "file": "disk0.qcow2", "size_mib": 32}],
        "nics": [{"network": "VM Network", "mac": "52:54:00:5a:00:01"}],
        "boot": {"kind": "kernel", "image": IMAGE, "cmdline": cmdline},
    }


VM = "vm1"
VM_UUID = str(uuid.uuid4())
TAP = f"vt-{VM_UUID.replace('-', '')[:8]}-0"


def serial(c: httpx.Client) -> str:
    r = c.get(f"/vms/{VM}/serial", params={"tail_bytes": 1 << 20})
    assert r.status_code == 200
    return r.text


def power(c: httpx.Client, action: str, timeout_s: float = 30) -> dict[str, Any]:
    # Wait longer than the agent: a shutdown that times out still answers (after its hard stop).
    r = c.post(f"/vms/{VM}/power", json={"action": action, "timeout_s": timeout_s}, timeout=timeout_s + 30)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def start(env: AgentEnv, c: httpx.Client) -> dict[str, Any]:
    rt = power(c, "start")
    assert rt["power_state"] == "poweredOn" and rt["pid"]
    env.qemu_pids.add(rt["pid"])
    return rt


def test_only_the_clusters_server_certificate_is_served(env: AgentEnv) -> None:
    with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake fails
        httpx.get(env.url + "/api/v1/health", verify=unverified_context())
    stranger = ServerTlsFiles.of(env.workdir / "stranger")  # a server of another cluster
    stranger.ensure([])
    with pytest.raises(httpx.HTTPError):
        httpx.get(env.url + "/api/v1/vms", verify=unverified_context(cert=stranger.cert, key=stranger.key))
    with env.client() as c:
        r = c.get("/health")
        der = r.extensions["network_stream"].get_extra_info("ssl_object").getpeercert(True)
    assert r.status_code == 200 and r.json()["name"] == "host-a"
    # what `vmshift-agent fingerprint` prints is the certificate it serves (its bootstrap one)
    printed = sh(str(BIN / "vmshift-agent"), "--config", str(env.config), "fingerprint").strip()
    assert printed == pki.fingerprint(der)
    assert pki.info_from_der(der).role is pki.Role.BOOTSTRAP


def test_facts(env: AgentEnv) -> None:
    with env.client() as c:
        facts = c.get("/facts").json()
    assert facts["accelerator"] == "tcg"  # /dev/kvm hangs guests here: the probe must notice
    assert "q35" in facts["machine_types"] and facts["default_machine_type"]
    models = {m["name"]: m["unavailable_features"] for m in facts["cpu_models"]}
    assert models["qemu64"] == []
    assert any(models.values()), "some CPU model should lack features on this host"
    assert facts["qemu_version"].startswith("10.")
    assert facts["cpu_vendor"] and facts["cpu_flags"]
    [ds] = facts["datastores"]
    assert ds["name"] == "ds1" and ds["images"] == [IMAGE] and ds["capacity_mib"] > 0
    assert facts["networks"] == {"VM Network": "br0"}
    assert facts["memory_total_mib"] > facts["memory_free_mib"] > 0


def test_define_start_stats_serial(env: AgentEnv) -> None:
    with env.client() as c:
        r = c.put(f"/vms/{VM}", json=vm_spec(VM, VM_UUID))
        assert r.status_code == 200, r.text
        assert r.json()["power_state"] == "poweredOff"
        # idempotent for the same uuid; a different uuid under the same name is a conflict
        assert c.put(f"/vms/{VM}", json=vm_spec(VM, VM_UUID)).status_code == 200
        r = c.put(f"/vms/{VM}", json=vm_spec(VM, str(uuid.uuid4())))
        assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
        disk = env.datastore / VM / "disk0.qcow2"
        info = json.loads(sh("qemu-img", "info", "--output=json", "-U", str(disk)))
        assert info["format"] == "qcow2" and info["virtual-size"] == 32 << 20
        assert json.loads((env.datastore / VM / "vm.json").read_text())["uuid"] == VM_UUID

        rt = start(env, c)
        assert VM_UUID in psutil.Process(rt["pid"]).cmdline()
        wait_for("the guest to boot", lambda: BOOT_LINE in serial(c), timeout=90)
        rt = c.get(f"/vms/{VM}").json()
        assert rt["power_state"] == "poweredOn" and rt["qemu_status"] == "running"
        assert rt["cpu_seconds"] > 0 and rt["rss_mib"] > 10
        assert [v["name"] for v in c.get("/vms").json()] == [VM]
    link = next(line for line in env.ns_links().splitlines() if f" {TAP}:" in line)
    assert "master br0" in link


def test_delete_refused_while_running(env: AgentEnv) -> None:
    with env.client() as c:
        r = c.delete(f"/vms/{VM}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
    assert (env.datastore / VM / "vm.json").exists()


def test_reset_reboots_the_guest(env: AgentEnv) -> None:
    with env.client() as c:
        before = serial(c).count(BOOT_LINE)
        power(c, "reset")
        wait_for("the guest to boot again", lambda: serial(c).count(BOOT_LINE) > before, timeout=90)


def test_vm_survives_agent_kill_and_is_reattached(env: AgentEnv) -> None:
    with env.client() as c:
        pid = c.get(f"/vms/{VM}").json()["pid"]
    env.kill_agent()
    assert not gone(pid)
    env.start_agent()
    with env.client() as c:
        rt = c.get(f"/vms/{VM}").json()
        assert rt["pid"] == pid and rt["power_state"] == "poweredOn" and not rt["died"]
        # the new QMP session works
        before = serial(c).count(BOOT_LINE)
        power(c, "reset")
        wait_for("the guest to boot after reset", lambda: serial(c).count(BOOT_LINE) > before, timeout=90)


SYS_PIDFD_GETFD = 438  # x86_64


def qmp_client_sockets(qemu_pid: int) -> list[socket.socket]:
    """Copies (pidfd_getfd) of QEMU's accepted QMP connections; the caller closes them.

    Unix sockets are listed per network namespace, so read QEMU's own view (/proc/PID/net/unix)."""
    qmp_inodes = set()
    for line in Path(f"/proc/{qemu_pid}/net/unix").read_text().splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 8 and cols[7].endswith("/qmp.sock"):
            qmp_inodes.add(cols[6])
    fds = [int(fd.name) for fd in Path(f"/proc/{qemu_pid}/fd").iterdir()
           if os.readlink(fd).removeprefix("socket:[").removesuffix("]") in qmp_inodes]
    libc = ctypes.CDLL(None, use_errno=True)
    found = []
    pidfd = os.pidfd_open(qemu_pid)
    try:
        for target_fd in fds:
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, target_fd, 0)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "pidfd_getfd failed")
            sock = socket.socket(fileno=fd)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                sock.close()  # the listening socket
            else:
                found.append(sock)
    finally:
        os.close(pidfd)
    return found


def test_lost_qmp_connection_is_reconnected(env: AgentEnv) -> None:
    """QEMU's monitor hangs up on the agent while the VM runs on: the agent connects again by itself."""
    with env.client() as c:
        rt = c.get(f"/vms/{VM}").json()
        assert rt["power_state"] == "poweredOn"
        clients = qmp_client_sockets(rt["pid"])
        assert len(clients) == 1, "the agent holds QEMU's one QMP connection"
        clients[0].shutdown(socket.SHUT_RDWR)  # as if the monitor dropped the agent
        clients[0].close()
        log = env.workdir / "agent.log"
        wait_for("the agent to reconnect QMP", lambda: f"reconnected QMP to VM {VM}" in log.read_text(),
                 timeout=30, interval=0.2)
        after = c.get(f"/vms/{VM}").json()
        assert after["pid"] == rt["pid"] and after["power_state"] == "poweredOn", after
        assert after["qemu_status"] == "running", after
        again = qmp_client_sockets(rt["pid"])
        for sock in again:
            sock.close()
        assert len(again) == 1, "exactly one QMP connection again: the agent's new one"
        before = serial(c).count(BOOT_LINE)
        power(c, "reset")  # a QMP command through the new connection
        wait_for("the guest to boot after reset", lambda: serial(c).count(BOOT_LINE) > before, timeout=90)


def test_hard_stop(env: AgentEnv) -> None:
    with env.client() as c:
        pid = c.get(f"/vms/{VM}").json()["pid"]
        rt = power(c, "stop")
    assert rt["power_state"] == "poweredOff" and rt["pid"] is None and not rt["died"]
    assert gone(pid)
    assert f" {TAP}:" not in env.ns_links()


def test_shutdown_times_out_then_stops_hard(env: AgentEnv) -> None:
    with env.client() as c:
        start(env, c)
        wait_for("the guest to boot", lambda: serial(c).count(BOOT_LINE) >= 1, timeout=90)
        t0 = time.monotonic()
        rt = power(c, "shutdown", timeout_s=2)
        took = time.monotonic() - t0
    assert rt["power_state"] == "poweredOff" and not rt["died"]
    assert "timed out" in (rt["exit_reason"] or "")
    assert took >= 2


def test_shutdown_graceful(env: AgentEnv) -> None:
    with env.client() as c:
        assert c.put(f"/vms/{VM}", json=vm_spec(VM, VM_UUID, cmdline="vmsa.acpi=1")).status_code == 200
        start(env, c)
        wait_for("acpid in the guest", lambda: "vmsa-guest: acpi on" in serial(c), timeout=90)
        t0 = time.monotonic()
        rt = power(c, "shutdown", timeout_s=60)
        took = time.monotonic() - t0
        assert "vmsa-guest: power button" in serial(c)
    assert rt["power_state"] == "poweredOff" and not rt["died"]
    assert rt["exit_reason"] == "guest-shutdown" and took < 60


def test_vm_killed_while_agent_down_is_reported_died(env: AgentEnv) -> None:
    with env.client() as c:
        pid = start(env, c)["pid"]
    env.kill_agent(signal.SIGTERM)  # a clean agent stop (uvicorn re-raises SIGTERM after it)
    assert "its VMs keep running" in (env.workdir / "agent.log").read_text()
    assert not gone(pid)
    psutil.Process(pid).kill()
    wait_for("QEMU to die", lambda: gone(pid), timeout=10)
    assert f" {TAP}:" in env.ns_links()  # nobody cleaned up yet
    env.start_agent()
    with env.client() as c:
        rt = c.get(f"/vms/{VM}").json()
    assert rt["power_state"] == "poweredOff" and rt["died"] and rt["pid"] is None
    assert f" {TAP}:" not in env.ns_links()


def test_delete(env: AgentEnv) -> None:
    with env.client() as c:
        assert c.delete(f"/vms/{VM}").status_code == 200
        r = c.get(f"/vms/{VM}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert c.get("/vms").json() == []
    assert not (env.datastore / VM).exists()


def test_bad_requests_get_error_bodies(env: AgentEnv) -> None:
    with env.client() as c:
        r = c.put("/vms/x1", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_input"
        spec = vm_spec("x1", str(uuid.uuid4()))
        spec["memory_mib"] = 1
        r = c.put("/vms/x1", json=spec)
        assert r.status_code == 422 and "memory_mib" in r.json()["error"]["message"]
        spec = vm_spec("x1", str(uuid.uuid4()))
        spec["nics"][0]["network"] = "Nope"
        r = c.put("/vms/x1", json=spec)
        assert r.status_code == 404 and "Nope" in r.json()["error"]["message"]
