"""The lab guest image boots under QEMU (TCG) and its workload does what the status says.

Real QEMU, user-mode networking with host forwards bound to 127.0.0.1 on free ports, a real qcow2
disk for the disk log. Every QEMU started here is killed at the end, pass or fail.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from vmshift.errors import ImageError
from vmshift.lab.image import build_image, image_present, install_image, kernel_args

pytestmark = pytest.mark.lab

READY = "vmshift-guest: ready"
WORKLOAD = kernel_args(ip="10.0.2.15/24", memtest=(32, 20), disklog=True)


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    """Polls ``check`` until it returns something truthy; fails the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Guest:
    """One QEMU process running the lab guest, with its serial log, QMP socket and forwarded ports.

    ``disks`` are qcow2 files on virtio-blk, in order (/dev/vda, /dev/vdb, ...).
    """

    def __init__(self, image: Path, disks: Path | Sequence[Path], workdir: Path, extra_args: str) -> None:
        self.workdir = workdir
        self.serial = workdir / "serial.log"
        self.qmp_path = workdir / "qmp.sock"
        self.tcp_port, self.status_port = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
        self.verify_port = free_port(socket.SOCK_STREAM)
        self.udp_port = free_port(socket.SOCK_DGRAM)
        meta = json.loads((image / "image.json").read_text())
        fwd = (
            f"hostfwd=tcp:127.0.0.1:{self.tcp_port}-:7000,hostfwd=udp:127.0.0.1:{self.udp_port}-:7001,"
            f"hostfwd=tcp:127.0.0.1:{self.status_port}-:7002,hostfwd=tcp:127.0.0.1:{self.verify_port}-:7003"
        )
        drives = []
        for disk in [disks] if isinstance(disks, Path) else disks:
            drives += ["-drive", f"file={disk},if=virtio,format=qcow2"]
        self.cmd = [
            "qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nographic", "-monitor", "none",
            "-serial", f"file:{self.serial}", "-no-reboot",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-kernel", str(image / meta["kernel"]), "-initrd", str(image / meta["initrd"]),
            "-append", f"{meta['cmdline']} {extra_args}",
            *drives,
            "-netdev", f"user,id=n0,{fwd}", "-device", "virtio-net-pci,netdev=n0,romfile=",
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.serial.unlink(missing_ok=True)
        self.qmp_path.unlink(missing_ok=True)
        log = (self.workdir / "qemu.out").open("wb")
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def serial_text(self) -> str:
        try:
            return self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float = 120) -> str:
        def ready() -> str | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(
                    f"QEMU exited ({self.proc.returncode}); serial log:\n{self.serial_text()[-3000:]}"
                )
            return next((ln for ln in self.serial_text().splitlines() if ln.startswith(READY)), None)

        try:
            return str(wait_for("the guest's ready line", ready, timeout))
        except pytest.fail.Exception as e:
            raise AssertionError(f"{e}; serial log:\n{self.serial_text()[-3000:]}") from e

    def status(self) -> dict[str, Any]:
        return self._json_line(self.status_port, 10)

    def verify(self) -> dict[str, Any]:
        """The guest re-reads its disk log and disk writer rings (TCP 7003) and says what it found."""
        return self._json_line(self.verify_port, 120)

    def _json_line(self, port: int, timeout: float) -> dict[str, Any]:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        assert data.endswith(b"\n") and data.count(b"\n") == 1, data
        result: dict[str, Any] = json.loads(data)
        return result

    def qmp(self, command: str) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.qmp_path))
            f = s.makefile("rw")
            f.readline()  # greeting
            for cmd in ("qmp_capabilities", command):
                f.write(json.dumps({"execute": cmd}) + "\n")
                f.flush()
                while "return" not in (reply := json.loads(f.readline())):
                    assert "error" not in reply, reply

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def guests() -> Iterator[list[Guest]]:
    """Collects every Guest a test starts and kills them all at the end, pass or fail."""
    started: list[Guest] = []
    yield started
    for guest in started:
        guest.kill()


def new_disk(path: Path, size: str = "64M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def boot(guests: list[Guest], image: Path, disk: Path, workdir: Path) -> Guest:
    workdir.mkdir(exist_ok=True)
    guest = Guest(image, disk, workdir, WORKLOAD)
    guests.append(guest)
    guest.start()
    return guest


def test_build_is_idempotent_and_installs(image: Path, tmp_path: Path) -> None:
    assert image.name == "lab-guest" and image_present(image.parent)
    meta = json.loads((image / "image.json").read_text())
    assert meta["kind"] == "kernel" and "console=ttyS0" in meta["cmdline"]
    mtime = (image / "initrd.img").stat().st_mtime_ns
    assert build_image(image.parent) == image
    assert (image / "initrd.img").stat().st_mtime_ns == mtime, "an up-to-date image was rebuilt"

    with pytest.raises(ImageError):
        install_image(tmp_path / "no-images", tmp_path)
    installed = install_image(image.parent, tmp_path)
    assert installed == tmp_path / "images" / "lab-guest"
    assert (installed / "vmlinuz").read_bytes() == (image / "vmlinuz").read_bytes()
    copied = (installed / "initrd.img").stat().st_mtime_ns
    assert install_image(image, tmp_path) == installed  # the folder itself is accepted too
    assert (installed / "initrd.img").stat().st_mtime_ns == copied, "an identical image was copied again"
    (installed / "initrd.img").write_bytes(b"damaged")
    install_image(image.parent, tmp_path)
    assert (installed / "initrd.img").read_bytes() == (image / "initrd.img").read_bytes()


@pytest.mark.timeout(300)
def test_guest_serves_echo_and_reports_workload(image: Path, guests: list[Guest], tmp_path: Path) -> None:
    guest = boot(guests, image, new_disk(tmp_path / "disk0.qcow2"), tmp_path / "vm")
    ready = guest.wait_ready()
    assert "ip=10.0.2.15/24" in ready and "memtest=32,20" in ready and "disklog=1" in ready

    # TCP echo: several concurrent long-lived connections, each round-tripping many times.
    conns = [socket.create_connection(("127.0.0.1", guest.tcp_port), timeout=15) for _ in range(8)]
    try:
        for rnd in range(5):
            for i, c in enumerate(conns):
                c.sendall(f"round {rnd} conn {i}\n".encode())
            for i, c in enumerate(conns):
                expected = f"round {rnd} conn {i}\n".encode()
                got = b""
                while len(got) < len(expected):
                    chunk = c.recv(4096)
                    assert chunk, "the guest closed an echo connection"
                    got += chunk
                assert got == expected
        assert guest.status()["echo"]["tcp_active"] == len(conns)
    finally:
        for c in conns:
            c.close()

    # UDP echo (retried: a datagram may be lost before slirp and the guest have met).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(2)
        for attempt in range(10):
            u.sendto(f"ping {attempt}".encode(), ("127.0.0.1", guest.udp_port))
            try:
                data, _ = u.recvfrom(2048)
            except TimeoutError:
                continue
            # a late reply to an earlier attempt counts too: it was echoed, only slowly
            assert data in {f"ping {a}".encode() for a in range(attempt + 1)}, data
            break
        else:
            pytest.fail("no UDP echo reply in 10 attempts")

    first = guest.status()
    mem, log = first["memtest"], first["disklog"]
    assert mem["enabled"] and mem["size_mib"] == 32 and mem["rate_mibps"] == 20 and mem["error"] is None
    assert log["enabled"] and log["device"] == "/dev/vda" and log["error"] is None
    assert log["records_verified_at_boot"] == 0 and log["corrupt_at_boot"] == 0
    second = wait_for(
        "memtest pages and durable_seq to grow",
        lambda: (
            s
            if (s := guest.status())["memtest"]["pages"] > mem["pages"]
            and s["disklog"]["durable_seq"] > log["durable_seq"]
            and s["memtest"]["passes"] >= 1
            else None
        ),
        timeout=60,
    )
    assert second["memtest"]["mismatches"] == 0
    assert second["disklog"]["errors"] == 0
    assert second["uptime_s"] >= first["uptime_s"]  # 0.1 s resolution: two quick reads may match


@pytest.mark.timeout(400)
def test_disk_log_survives_kill_and_acpi_shutdown(image: Path, guests: list[Guest], tmp_path: Path) -> None:
    disk = new_disk(tmp_path / "disk0.qcow2")
    guest = boot(guests, image, disk, tmp_path / "boot1")
    guest.wait_ready()
    before = wait_for(
        "at least 20 durable records",
        lambda: s if (s := guest.status())["disklog"]["durable_seq"] >= 20 else None,
        timeout=60,
    )
    guest.kill()  # a power cut: every record acknowledged before it must survive

    guest = boot(guests, image, disk, tmp_path / "boot2")
    guest.wait_ready()
    after = guest.status()["disklog"]
    durable_before = before["disklog"]["durable_seq"]
    assert after["corrupt_at_boot"] == 0
    assert after["records_verified_at_boot"] >= durable_before
    assert after["first_seq"] == after["records_verified_at_boot"] + 1
    wait_for(
        "durable_seq to continue above the previous boot's",
        lambda: guest.status()["disklog"]["durable_seq"] > after["first_seq"],
        timeout=60,
    )

    # ACPI power button -> acpid -> poweroff -f: QEMU (-no-reboot) exits by itself.
    guest.qmp("system_powerdown")
    wait_for("QEMU to exit after an ACPI shutdown", guest.exited, timeout=60)
    assert "ACPI power button" in guest.serial_text()
