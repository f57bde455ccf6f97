"""Real libvirt as a benchmark peer: one libvirtd (+ virtlogd) per lab host namespace.

    .venv/bin/python -m bench.suite.libvirt_selftest    # as root, from the repository root

Each daemon runs inside its host's network namespace and in a private mount namespace
(`unshare -m --propagation private`) where `/etc/libvirt`, `/run/libvirt`, `/var/lib/libvirt`,
`/var/log/libvirt` and `/var/cache/libvirt` are bind mounts of `WORK/libvirt-host-K/...`: two daemons
on one machine share nothing but the lab's shared datastore. Guests migrate with plain
`virsh migrate --live` and no tuning flag, i.e. with libvirt's defaults. Every setting and why:
docs/performance-libvirt.md. Install libvirt with scripts/install-bench.sh.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from vmshift.errors import VmshiftError
from vmshift.lab import lab as labmod
from vmshift.lab.layout import LabLayout, LabRecord

LIBVIRT_DIRS = ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt")
DISK_MIB = 64
# Addresses .200 + k of the VM network: vmshift's pool is .100-.199 (layout.pool_first/last) and the
# client is .2, so vmshift's allocator never hands these out.
GUEST_IP_BASE = 200
GUEST_IP_COUNT = 50
# vmshift's generate_mac always uses 52:54:00; 52:54:01 is as locally administered and never collides.
GUEST_MAC_PREFIX = "52:54:01"
_SEND_MSG = re.compile(r"^(\S+ \S+): .*QEMU_MONITOR_SEND_MSG: mon=\S+ msg=(\{.*\})\s*$")
_MIGRATION_COMMANDS = ("migrate-set-capabilities", "migrate-set-parameters", "migrate", "migrate-incoming",
                       "migrate_cancel", "migrate-continue", "cont", "stop")  # fmt: skip


class LibvirtPeerError(VmshiftError):
    """libvirt (a daemon, virsh or a guest under it) did not do what the benchmark asked."""


@dataclass(frozen=True)
class LibvirtGuest:
    name: str  # libvirt domain name
    memory_mib: int
    cpus: int
    kernel_args: str  # extra args, e.g. "vmshift.memtest=512,0 vmshift.disklog=1"; ip and console are added
    ip: str  # on the VM network, outside vmshift's pool (see pick_guest)
    mac: str


@dataclass
class _Daemon:
    """One libvirtd of lab host k: its addresses, private directories and processes."""

    k: int
    ns: str
    rpc_address: str  # management network: libvirt's RPC (virsh, daemon to daemon)
    mig_address: str  # migration network: QEMU's migration stream
    root: Path
    proc: subprocess.Popen[bytes] | None = None  # libvirtd
    logd: subprocess.Popen[bytes] | None = None  # virtlogd
    mnt_ns: str | None = None
    log_offset: int = 0

    @property
    def uri(self) -> str:
        return f"qemu+tcp://{self.rpc_address}/system"

    def private(self, system_dir: str) -> Path:
        return self.root / system_dir.strip("/").replace("/", "-")

    @property
    def log(self) -> Path:
        return self.private("/var/log/libvirt") / "libvirtd.log"


def _run(args: list[str], *, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LibvirtPeerError(f"'{' '.join(args)}' could not run: {e}.") from e
    if check and proc.returncode != 0:
        raise LibvirtPeerError(f"'{' '.join(args)}' failed: {_last_line(proc.stderr or proc.stdout)}")
    return proc


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def parse_jobinfo(text: str) -> dict[str, str]:
    """`virsh domjobinfo` output ("Key:   value" lines) as a dict of strings."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def _number(value: str | None) -> float | None:
    """The number at the start of a domjobinfo value such as '123 ms' or '1.5 MiB'."""
    m = re.match(r"^-?\d+(?:\.\d+)?", (value or "").strip())
    return float(m.group(0)) if m else None


def domain_xml(g: LibvirtGuest, *, kernel: Path, initrd: Path, cmdline: str, disk: Path, serial: Path) -> str:
    """The domain: TCG, direct kernel boot, a virtio-blk qcow2 disk, a virtio-net NIC on br0, serial to file.

    `cache='none'` on the disk: libvirt refuses a live migration of a disk with any other cache mode
    unless told `--unsafe`, which would be a tuning flag. USB and the balloon are off, as in vmshift's
    `-nodefaults` guests; everything else is libvirt's default for the machine.
    """
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = g.name
    ET.SubElement(dom, "memory", unit="MiB").text = str(g.memory_mib)
    ET.SubElement(dom, "vcpu").text = str(g.cpus)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
    ET.SubElement(os_el, "kernel").text = str(kernel)
    ET.SubElement(os_el, "initrd").text = str(initrd)
    ET.SubElement(os_el, "cmdline").text = cmdline
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"
    dev = ET.SubElement(dom, "devices")
    ET.SubElement(dev, "emulator").text = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
    d = ET.SubElement(dev, "disk", type="file", device="disk")
    ET.SubElement(d, "driver", name="qemu", type="qcow2", cache="none")
    ET.SubElement(d, "source", file=str(disk))
    ET.SubElement(d, "target", dev="vda", bus="virtio")
    nic = ET.SubElement(dev, "interface", type="bridge")
    ET.SubElement(nic, "mac", address=g.mac)
    ET.SubElement(nic, "source", bridge="br0")
    ET.SubElement(nic, "model", type="virtio")
    ser = ET.SubElement(dev, "serial", type="file")
    ET.SubElement(ser, "source", path=str(serial), append="on")
    ET.SubElement(ser, "target", port="0")
    ET.SubElement(dev, "controller", type="usb", model="none")
    ET.SubElement(dev, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


class LibvirtLab:
    """Context manager: a libvirtd (+ virtlogd) per lab host namespace; everything removed on exit."""

    def __init__(self, lab_name: str, work: Path) -> None:
        self.lab_name = lab_name
        self.work = Path(work).resolve()
        self.unavailable: str | None = None
        self._rec: LabRecord | None = None
        self._daemons: dict[int, _Daemon] = {}
        self._disks: dict[str, Path] = {}

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> LibvirtLab:
        try:
            self._start()
        except Exception as e:
            self.unavailable = str(e).strip() or type(e).__name__
            self._stop()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop()

    @property
    def layout(self) -> LabLayout:
        if self._rec is None:
            self._rec = labmod.get(self.lab_name)
        return self._rec.layout

    def _start(self) -> None:
        if os.geteuid() != 0:
            raise LibvirtPeerError("libvirt's daemons need root; run the benchmark as root.")
        missing = [b for b in ("libvirtd", "virtlogd", "virsh", "qemu-img", "unshare") if not shutil.which(b)]
        if missing:
            raise LibvirtPeerError(f"{', '.join(missing)} not installed; run scripts/install-bench.sh.")
        lay = self.layout
        self.work.mkdir(parents=True, exist_ok=True)
        # The bind mounts need their mount points; /run/libvirt exists only once a libvirt ran here.
        # It stays (empty): removing it could detach another run's mounts in its own namespace.
        for d in LIBVIRT_DIRS:
            Path(d).mkdir(parents=True, exist_ok=True)
        for k in lay.host_numbers:
            dmn = _Daemon(k, lay.host_ns(k), lay.host_mgmt_address(k), lay.host_mig_address(k),
                          self.work / f"libvirt-host-{k}")  # fmt: skip
            self._daemons[k] = dmn
            self._configure(dmn, lay)
            self._launch(dmn)
        for dmn in self._daemons.values():
            self._wait_ready(dmn)
            self._launch_virtlogd(dmn)
        # The first use of a fresh daemon probes QEMU's capabilities (seconds under TCG): pay it now.
        probes = [(d, subprocess.Popen(["virsh", "-q", "-c", d.uri, "domcapabilities", "--virttype", "qemu"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
                  for d in self._daemons.values()]  # fmt: skip
        for dmn, p in probes:
            _, err = p.communicate(timeout=180)
            if p.returncode != 0:
                raise LibvirtPeerError(
                    f"libvirtd of host-{dmn.k} cannot probe QEMU: {_last_line(err.decode())}"
                )

    def _configure(self, dmn: _Daemon, lay: LabLayout) -> None:
        for d in LIBVIRT_DIRS:
            dmn.private(d).mkdir(parents=True, exist_ok=True)
        etc = dmn.private("/etc/libvirt")
        shutil.copytree("/etc/libvirt", etc, dirs_exist_ok=True)
        host_uuid = uuid.uuid5(uuid.NAMESPACE_URL, f"vmshift-libvirt-peer:{lay.name}:{dmn.k}")
        (etc / "libvirtd.conf").write_text(
            "listen_tls = 0\nlisten_tcp = 1\n"
            f'listen_addr = "{dmn.rpc_address}"\nauth_tcp = "none"\n'
            f'host_uuid = "{host_uuid}"\n'
            # QMP traffic (logged at level info): the record of what libvirt asked QEMU to migrate with
            'log_filters = "2:qemu.qemu_monitor"\n'
            'log_outputs = "2:file:/var/log/libvirt/libvirtd.log"\n'
        )
        (etc / "qemu.conf").write_text(
            'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\n'
            'security_driver = "none"\ncgroup_controllers = [ ]\n'
            f'migration_address = "{dmn.mig_address}"\nmigration_host = "{dmn.mig_address}"\n'
            f'shared_filesystems = [ "{lay.shared_datastore}" ]\n'
        )
        (etc / "virtlogd.conf").write_text('log_outputs = "3:file:/var/log/libvirt/virtlogd.log"\n')

    def _launch(self, dmn: _Daemon) -> None:
        mounts = "; ".join(f"mount --bind {dmn.private(d)} {d}" for d in LIBVIRT_DIRS)
        libvirtd = "libvirtd --listen -f /etc/libvirt/libvirtd.conf -p /run/libvirt/libvirtd.pid"
        script = f"set -e; {mounts}; exec {libvirtd}"
        out = (dmn.root / "daemon.out").open("wb")
        dmn.proc = subprocess.Popen(
            ["ip", "netns", "exec", dmn.ns, "unshare", "--mount", "--propagation", "private",
             "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        out.close()

    def _launch_virtlogd(self, dmn: _Daemon, timeout_s: float = 15) -> None:
        """virtlogd in libvirtd's namespaces, as a child of this process (so it is reaped, never a zombie)."""
        assert dmn.proc is not None
        sock = dmn.private("/run/libvirt") / "virtlogd-sock"
        out = (dmn.root / "virtlogd.out").open("wb")
        dmn.logd = subprocess.Popen(
            ["nsenter", "-t", str(dmn.proc.pid), "-m", "-n", "virtlogd", "-f", "/etc/libvirt/virtlogd.conf",
             "-p", "/run/libvirt/virtlogd.pid"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        out.close()
        deadline = time.monotonic() + timeout_s
        while not sock.exists():
            if dmn.logd.poll() is not None or time.monotonic() > deadline:
                output = (dmn.root / "virtlogd.out").read_text(errors="replace")
                raise LibvirtPeerError(f"virtlogd of host-{dmn.k} did not start: {_last_line(output)}")
            time.sleep(0.1)

    def _wait_ready(self, dmn: _Daemon, timeout_s: float = 30) -> None:
        assert dmn.proc is not None
        deadline = time.monotonic() + timeout_s
        while True:
            if dmn.proc.poll() is not None:
                raise LibvirtPeerError(
                    f"libvirtd of host-{dmn.k} exited at start: {self._daemon_output(dmn)}"
                )
            with contextlib.suppress(OSError):
                dmn.mnt_ns = os.readlink(f"/proc/{dmn.proc.pid}/ns/mnt")
            if _run(["virsh", "-q", "-c", dmn.uri, "version"], check=False, timeout=10).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise LibvirtPeerError(
                    f"libvirtd of host-{dmn.k} did not answer on {dmn.uri} within {timeout_s:.0f} s: "
                    f"{self._daemon_output(dmn)}"
                )
            time.sleep(0.3)

    @staticmethod
    def _daemon_output(dmn: _Daemon) -> str:
        texts = []
        for f in (dmn.root / "daemon.out", dmn.log):
            with contextlib.suppress(OSError):
                texts.append(f.read_text(errors="replace"))
        errors = [ln for t in texts for ln in t.splitlines() if "error" in ln.lower()]
        return _last_line("\n".join(errors or texts))

    def _stop(self) -> None:
        """Destroy every domain, stop the daemons, kill whatever still lives in their mount namespaces."""
        for dmn in self._daemons.values():
            if dmn.proc is not None and dmn.proc.poll() is None:
                with contextlib.suppress(LibvirtPeerError):
                    listing = _run(["virsh", "-q", "-c", dmn.uri, "list", "--all", "--name"], timeout=15)
                    names = listing.stdout.split()
                    for name in names:
                        _run(["virsh", "-q", "-c", dmn.uri, "destroy", name], check=False, timeout=30)
                        _run(["virsh", "-q", "-c", dmn.uri, "undefine", name], check=False, timeout=30)
        for dmn in self._daemons.values():
            # a QEMU that `destroy` did not end (it lives in a mount namespace of its own)
            self._kill_qemus(dmn)
            for p in (dmn.proc, dmn.logd):
                if p is not None and p.poll() is None:
                    p.terminate()
        deadline = time.monotonic() + 15
        for dmn in self._daemons.values():
            for p in (dmn.proc, dmn.logd):
                if p is None:
                    continue
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
            if dmn.mnt_ns is not None:  # anything else that still holds the private mounts
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    for pid in self._pids_in(dmn.mnt_ns):
                        with contextlib.suppress(OSError):
                            os.kill(pid, sig)
                    end = time.monotonic() + 10
                    while self._pids_in(dmn.mnt_ns) and time.monotonic() < end:
                        time.sleep(0.2)
        for disk in self._disks.values():
            with contextlib.suppress(OSError):
                disk.unlink()
        self._disks.clear()
        self._daemons.clear()

    @staticmethod
    def _kill_qemus(dmn: _Daemon) -> None:
        for pidfile in (dmn.private("/run/libvirt") / "qemu").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text().strip())
                if b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)

    @staticmethod
    def _mnt_ns(pid: int) -> str | None:
        try:
            return os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:
            return None

    def _pids_in(self, mnt_ns: str) -> list[int]:
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and self._mnt_ns(int(p)) == mnt_ns]

    # ------------------------------------------------------------ virsh

    def _virsh(self, k: int, *args: str, timeout: float = 60) -> str:
        if self.unavailable is not None:
            raise LibvirtPeerError(f"libvirt is unavailable: {self.unavailable}")
        if k not in self._daemons:
            raise LibvirtPeerError(f"There is no libvirtd on host-{k} (hosts: {sorted(self._daemons)}).")
        return _run(["virsh", "-q", "-c", self._daemons[k].uri, *args], timeout=timeout).stdout

    def _state(self, k: int, name: str) -> str | None:
        proc = _run(["virsh", "-q", "-c", self._daemons[k].uri, "domstate", name], check=False, timeout=30)
        return proc.stdout.strip() if proc.returncode == 0 else None

    # ------------------------------------------------------------ guests

    def pick_guest(self, lab_name: str, k: int) -> tuple[str, str]:
        """(ip, mac) of the k-th libvirt guest (k = 0..49): VM network .200+k, MAC 52:54:01:<lab>:00:<k>."""
        if not 0 <= k < GUEST_IP_COUNT:
            raise LibvirtPeerError(f"Guest number {k} is outside 0..{GUEST_IP_COUNT - 1}.")
        lay = labmod.get(lab_name).layout
        return f"{lay.vm_net}.{GUEST_IP_BASE + k}", f"{GUEST_MAC_PREFIX}:{lay.index:02x}:00:{k:02x}"

    def start_guest(self, host: int, g: LibvirtGuest, timeout_s: float = 120) -> None:
        """Define and start g on host; return once the guest answers the lab's probe."""
        lay = self.layout
        image = lay.shared_datastore / "images" / "lab-guest"
        meta = json.loads((image / "image.json").read_text())
        prefix = lay.vm_cidr.rsplit("/", 1)[1]
        parts = (str(meta.get("cmdline", "console=ttyS0")), f"vmshift.ip={g.ip}/{prefix}", g.kernel_args)
        cmdline = " ".join(p for p in parts if p)
        disk = lay.shared_datastore / "libvirt-peer" / f"{g.name}.qcow2"
        disk.parent.mkdir(parents=True, exist_ok=True)
        disk.unlink(missing_ok=True)
        _run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), f"{DISK_MIB}M"])
        self._disks[g.name] = disk
        xml = self.work / f"{g.name}.xml"
        xml.write_text(domain_xml(g, kernel=image / str(meta["kernel"]), initrd=image / str(meta["initrd"]),
                                  cmdline=cmdline, disk=disk, serial=self.serial_log(g.name)))  # fmt: skip
        self._virsh(host, "define", str(xml))
        self._virsh(host, "start", g.name, timeout=120)
        deadline = time.monotonic() + timeout_s
        while True:
            answer = self.check(g.ip)
            if answer.get("echo") and "error" not in answer:
                return
            if time.monotonic() > deadline:
                tail = self.serial_log(g.name).read_text(errors="replace")[-600:] if self.serial_log(
                    g.name).exists() else "no serial output"  # fmt: skip
                raise LibvirtPeerError(f"Guest {g.name} did not answer at {g.ip} within {timeout_s:.0f} s; "
                                       f"serial console ends: {tail!r}")  # fmt: skip
            time.sleep(1.0)

    def serial_log(self, name: str) -> Path:
        return self.work / f"{name}.serial.log"

    def check(self, ip: str) -> dict[str, Any]:
        """The lab probe's answer for ip (echo, memtest, disklog), asked from the client namespace."""
        if self._rec is None:
            self._rec = labmod.get(self.lab_name)
        return labmod.run_probe(self._rec, ["check", ip])

    def host_of(self, name: str) -> int:
        """The host whose libvirtd runs the domain (running or paused) now."""
        active = [k for k in self._daemons if self._state(k, name) in ("running", "paused")]
        if len(active) != 1:
            where = {k: self._state(k, name) for k in self._daemons}
            raise LibvirtPeerError(f"Domain {name} is active on {len(active)} hosts, not one: {where}.")
        return active[0]

    def destroy_guest(self, name: str) -> None:
        for k in self._daemons:
            state = self._state(k, name)
            if state in ("running", "paused"):
                self._virsh(k, "destroy", name)
            if state is not None:
                _run(["virsh", "-q", "-c", self._daemons[k].uri, "undefine", name], check=False)
        disk = self._disks.pop(name, None)
        if disk is not None:
            disk.unlink(missing_ok=True)

    # ------------------------------------------------------------ migration

    def migrate(self, name: str, src: int, dst: int, timeout_s: float) -> dict[str, Any]:
        """`virsh migrate --live NAME DST_URI` with libvirt's defaults, run in src's namespace.

        Past timeout_s the job is aborted (`virsh domjobabort`) and the guest is made sure to run on
        src again. Where each value comes from is in the result's `sources`.
        """
        if self.host_of(name) != src:
            raise LibvirtPeerError(f"Domain {name} does not run on host-{src}.")
        s, d = self._daemons[src], self._daemons[dst]
        params: dict[str, Any] = {
            "downtime_limit_ms": _number(self._virsh(src, "migrate-getmaxdowntime", name)),
            "max_bandwidth_mibps": _number(self._virsh(src, "migrate-getspeed", name)),
            "postcopy_bandwidth_mibps": _number(self._virsh(src, "migrate-getspeed", name, "--postcopy")),
        }
        for dmn in (s, d):
            dmn.log_offset = dmn.log.stat().st_size if dmn.log.exists() else 0
        cmd = ["ip", "netns", "exec", s.ns, "virsh", "-q", "-c", s.uri, "migrate", "--live", name, d.uri]
        run = _MigrationRun(cmd, s.uri, name, timeout_s)
        where = self._ensure_on(name, src) if run.aborted else self.host_of(name)
        converged = run.returncode == 0 and where == dst
        jobinfo, job_from = self._completed_jobinfo(name, dst if converged else src)
        if jobinfo:
            stats, stats_from = jobinfo, f"`virsh domjobinfo --completed` on {job_from}"
        else:  # libvirt keeps no statistics of an aborted or failed job
            stats, stats_from = (
                (run.samples[-1] if run.samples else {}),
                (f"the last 1 s sample of `virsh domjobinfo` on host-{src} before the job ended"),
            )
        params["qemu_commands"] = {f"host-{dmn.k}": self._monitor_commands(dmn) for dmn in (s, d)}
        return {
            "converged": converged,
            "aborted": run.aborted,
            "host_after": where,
            "state_after": self._virsh(where, "domstate", name, "--reason").strip(),
            "total_ms": _number(jobinfo.get("Time elapsed")) if jobinfo else round(run.wall_ms, 1),
            "wall_ms": round(run.wall_ms, 1),
            "downtime_ms": _number(jobinfo.get("Total downtime")),
            "bytes_sent": _bytes(stats.get("Data processed")),
            "memory_bytes": _bytes(stats.get("Memory processed")),
            "iterations": _number(stats.get("Iteration")),
            "error": None if run.returncode == 0 else run.error,
            "jobinfo": jobinfo,
            "last_sample": run.samples[-1] if run.samples else None,
            "samples": len(run.samples),
            "parameters": params,
            "command": " ".join(cmd),
            "sources": {
                "total_ms": f"'Time elapsed' of {stats_from}" if jobinfo
                            else "wall clock from `virsh migrate` to the end of the aborted job",
                "wall_ms": "wall clock of the `virsh migrate` command (connections, target QEMU start, job)",
                "downtime_ms": f"'Total downtime' of {stats_from}" if jobinfo else "none: no switchover",
                "bytes_sent": f"'Data processed' of {stats_from}",
                "downtime_limit_ms": "`virsh migrate-getmaxdowntime` on the source before the migration "
                                     "(QEMU's downtime-limit as libvirt reads it)",
                "max_bandwidth_mibps": "`virsh migrate-getspeed` on the source before the migration "
                                       "(what libvirt sets as QEMU's max-bandwidth at migrate start)",
                "qemu_commands": "QMP commands libvirt sent to each QEMU in this migration: the "
                                 "QEMU_MONITOR_SEND_MSG lines of libvirtd.log (filter 2:qemu.qemu_monitor)",
            },
        }  # fmt: skip

    def _ensure_on(self, name: str, src: int) -> int:
        """After an abort: the guest runs (unpaused) on src and nowhere else, or an error says where it is."""
        deadline = time.monotonic() + 30
        while self._state(src, name) == "paused" and time.monotonic() < deadline:
            # libvirt resumes an aborted source itself; resume only if it stays paused
            time.sleep(1.0)
            if self._state(src, name) == "paused":
                _run(["virsh", "-q", "-c", self._daemons[src].uri, "resume", name], check=False)
        return self.host_of(name)

    def _completed_jobinfo(self, name: str, k: int) -> tuple[dict[str, str], str]:
        for host in (k, *(h for h in self._daemons if h != k)):
            proc = _run(["virsh", "-q", "-c", self._daemons[host].uri, "domjobinfo", name, "--completed",
                         "--keep-completed"], check=False, timeout=30)  # fmt: skip
            info = parse_jobinfo(proc.stdout) if proc.returncode == 0 else {}
            if info and info.get("Job type") not in (None, "None"):
                return info, f"host-{host}"
        return {}, "no host"

    def _monitor_commands(self, dmn: _Daemon) -> list[dict[str, Any]]:
        try:
            with dmn.log.open("rb") as f:
                f.seek(dmn.log_offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return []
        found: list[dict[str, Any]] = []
        for line in text.splitlines():
            m = _SEND_MSG.match(line)
            if not m:
                continue
            with contextlib.suppress(ValueError):
                msg = json.loads(m.group(2))
                if msg.get("execute") in _MIGRATION_COMMANDS:
                    found.append(
                        {"time": m.group(1), "execute": msg["execute"], "arguments": msg.get("arguments")}
                    )
        return found


class _MigrationRun:
    """One `virsh migrate` process, sampled every second and aborted past its timeout."""

    def __init__(self, cmd: list[str], src_uri: str, name: str, timeout_s: float) -> None:
        self.samples: list[dict[str, str]] = []
        self.aborted = False
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while proc.poll() is None:
            if time.monotonic() - t0 > timeout_s:
                self.aborted = True
                _run(["virsh", "-q", "-c", src_uri, "domjobabort", name], check=False, timeout=30)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                break
            live = _run(["virsh", "-q", "-c", src_uri, "domjobinfo", name], check=False, timeout=10)
            if live.returncode == 0 and (info := parse_jobinfo(live.stdout)).get("Job type") == "Unbounded":
                self.samples.append(info)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
        self.wall_ms = (time.monotonic() - t0) * 1000
        out, err = proc.communicate()
        self.returncode = proc.returncode
        self.error = _last_line(err or out)


def _bytes(value: str | None) -> int | None:
    """'1.234 MiB' (domjobinfo's unit-suffixed sizes) as bytes."""
    n = _number(value)
    if n is None or value is None:
        return None
    units = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
    unit = value.split()[-1] if len(value.split()) > 1 else "B"
    return int(n * units.get(unit, 1))
