"""The pure parts of the debian-12 builder (lab/debian_image.py): its partition table and its
mmdebstrap command."""

from __future__ import annotations

import struct
from pathlib import Path

from vmshift.lab.debian_image import BOOT_START_MIB, MIB, PACKAGES, SECTOR, mbr, mmdebstrap_argv


def test_mbr_has_the_boot_code_a_bootable_fat_and_a_linux_root() -> None:
    code = b"\xfa" * 500  # longer than the 440 bytes of boot code an MBR holds
    sector = mbr(code, 64, 1000)
    assert len(sector) == SECTOR and sector[:440] == code[:440] and sector[510:] == b"\x55\xaa"
    entries = [struct.unpack("<B3sB3sII", sector[446 + 16 * i:462 + 16 * i]) for i in range(4)]
    per_mib = MIB // SECTOR
    assert entries[0][0] == 0x80 and entries[0][2] == 0x0E
    assert (entries[0][4], entries[0][5]) == (BOOT_START_MIB * per_mib, 64 * per_mib)
    assert entries[1][0] == 0 and entries[1][2] == 0x83
    assert (entries[1][4], entries[1][5]) == ((BOOT_START_MIB + 64) * per_mib, 1000 * per_mib)
    assert entries[2] == entries[3] == (0, b"\0\0\0", 0, b"\0\0\0", 0, 0)


def test_mmdebstrap_installs_what_the_guest_needs() -> None:
    argv = mmdebstrap_argv(Path("/tmp/root"))
    include = next(a for a in argv if a.startswith("--include=")).removeprefix("--include=").split(",")
    for package in ("systemd", "openssh-server", "cloud-init", "qemu-guest-agent", "linux-image-cloud-amd64"):
        assert package in include
    assert include == list(PACKAGES) and argv[-3:] == ["bookworm", "/tmp/root", "http://deb.debian.org/debian"]
