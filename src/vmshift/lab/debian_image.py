"""Build ``debian-12``: a bootable qcow2 of Debian 12 from Debian's packages, for VMs made from a disk
image (``vmshift image build --kind debian``; docs/images.md).

mmdebstrap installs bookworm with systemd, openssh-server, cloud-init, qemu-guest-agent, ifupdown
(cloud-init's network renderer on Debian) and the cloud kernel into a directory; the lab guest's daemon
``vmshift-guestd`` is added as a systemd service (the same memory test as ``lab-disk``), so ``vmshift lab
check`` works on it. The disk is put together without a loop device or a mount: an MBR (written
here, SYSLINUX's ``mbr.bin`` as its boot code), a FAT boot partition with the kernel, the initramfs and
SYSLINUX (``mformat``/``mcopy``/``syslinux --offset``), and an ext4 root made from the directory by
``mke2fs -d`` at its partition's offset; then ``qemu-img convert`` to qcow2. cloud-init reads only the
NoCloud seed (``datasource_list``), so the guest needs no network at boot.

Cached like ``lab-guest``: the build is skipped while the folder holds a build of the same inputs (the
package list, the daemon's sources and this builder); ``--force`` rebuilds with today's packages.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import uuid
from pathlib import Path

from vmshift.errors import ImageError
from vmshift.lab import image as lab
from vmshift.lab.disk_image import DISK_FILE, syslinux_config
from vmshift.lab.image import DEFAULT_CACHE_DIR, DEFAULT_IMAGES_DIR, FINGERPRINT_FILE, GUEST_SOURCES, Progress

DEBIAN_IMAGE_NAME = "debian-12"
DEBIAN_BUILDER_VERSION = "2"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("systemd", "systemd-sysv", "udev", "dbus", "openssh-server", "cloud-init", "qemu-guest-agent",
            "linux-image-cloud-amd64", "initramfs-tools", "ifupdown", "iproute2", "netbase", "procps",
            "e2fsprogs")  # resize2fs and fsck.ext4: cloud-init's resizefs and systemd-fsck fail without them
MIB = 1 << 20
SECTOR = 512
BOOT_START_MIB = 1  # the first partition starts at 1 MiB, as fdisk places it
BOOT_MIB = 64
ROOT_FREE_MIB = 768  # room in the root filesystem beyond the installed system
MBR_BIN = Path("/usr/lib/syslinux/mbr/mbr.bin")
GUESTD = "/usr/local/sbin/vmshift-guestd"
#: The same workload as lab-disk's guest (lab/disk_image.py), so `lab check` verifies guest memory.
GUESTD_UNIT = f"""[Unit]
Description=vmshift lab guest daemon (lab check, memory test)
After=network.target

[Service]
ExecStart={GUESTD} --ready-file /run/guestd.ready --memtest 16,10
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""
#: NoCloud only: no probing of cloud metadata services over a network the lab does not have.
#: No locale module either: the image has no locales package (its failure left systemd 'degraded').
CLOUD_CFG = """datasource_list: [NoCloud, None]
datasource:
  NoCloud:
    fs_label: cidata
locale: false
"""
CMDLINE = "console=ttyS0 net.ifnames=0"


def debian_image_present(images_dir: Path = DEFAULT_IMAGES_DIR) -> bool:
    folder = images_dir / DEBIAN_IMAGE_NAME
    try:
        meta = json.loads((folder / "image.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("kind") == "disk" and (folder / DISK_FILE).is_file()


def mmdebstrap_argv(root: Path, mirror: str = MIRROR) -> list[str]:
    """Debian from its packages into ``root`` (as root, no user namespace); docs and locales left out."""
    return ["mmdebstrap", "--mode=root", "--variant=apt", f"--include={','.join(PACKAGES)}",
            "--aptopt=Acquire::Retries \"3\"", "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/locale/*",
            SUITE, str(root), mirror]


def mbr(boot_code: bytes, boot_mib: int, root_mib: int) -> bytes:
    """The disk's first sector: SYSLINUX's boot code, a partition table of a bootable FAT16 (LBA,
    type 0x0e) boot partition at 1 MiB and a Linux (0x83) root after it, and the 0x55AA signature.
    CHS fields hold the 'use LBA' marker (1023/254/63), as partitioning tools write for large disks."""
    sectors = MIB // SECTOR

    def entry(bootable: bool, kind: int, start_mib: int, size_mib: int) -> bytes:
        chs = b"\xfe\xff\xff"
        return struct.pack("<B3sB3sII", 0x80 if bootable else 0, chs, kind, chs, start_mib * sectors,
                           size_mib * sectors)

    table = (entry(True, 0x0E, BOOT_START_MIB, boot_mib)
             + entry(False, 0x83, BOOT_START_MIB + boot_mib, root_mib) + bytes(32))
    return boot_code[:440].ljust(440, b"\0") + bytes(6) + table + b"\x55\xaa"


def build_debian_image(
    images_dir: Path = DEFAULT_IMAGES_DIR, *, force: bool = False, progress: Progress | None = None
) -> Path:
    """Build ``images_dir/debian-12/{disk.qcow2, image.json}`` and return that folder."""
    say: Progress = progress or (lambda _msg: None)
    folder = images_dir / DEBIAN_IMAGE_NAME
    cache = DEFAULT_CACHE_DIR
    lab._mkdirs(images_dir, cache)
    with lab._locked(cache / "debian-image-build.lock"):
        fingerprint = _fingerprint()
        built = lab._read(folder / FINGERPRINT_FILE) == fingerprint
        if not force and built and debian_image_present(images_dir):
            say(f"{DEBIAN_IMAGE_NAME} is up to date")
            return folder
        with tempfile.TemporaryDirectory(prefix=".debian-build-", dir=images_dir) as tmp:
            work = Path(tmp)
            root = work / "root"
            say(f"installing Debian {SUITE} with mmdebstrap (downloads about 200 MiB of packages)")
            _tool(mmdebstrap_argv(root), "install Debian with mmdebstrap",
                  "Install mmdebstrap (scripts/install-system.sh) and check that the Debian mirror answers.")
            say("adding vmshift-guestd and the cloud-init configuration")
            lab._compile_daemon(work / "vmshift-guestd")
            boot_files = _customize(root, work / "vmshift-guestd", work / "boot")
            out = work / DEBIAN_IMAGE_NAME
            out.mkdir()
            size_mib = _write_disk(root, boot_files, work / "disk.raw", say)
            _tool(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(work / "disk.raw"),
                   str(out / DISK_FILE)], "convert the disk to qcow2")
            meta = {"name": DEBIAN_IMAGE_NAME, "kind": "disk", "disk": DISK_FILE, "disk_size_mib": size_mib}
            (out / "image.json").write_text(json.dumps(meta, indent=2) + "\n")
            (out / FINGERPRINT_FILE).write_text(fingerprint + "\n")
            lab._replace_dir(out, folder)
    say(f"{DEBIAN_IMAGE_NAME} built in {folder}")
    return folder


def install_debian_image(images_dir: Path, datastore_path: Path) -> Path | None:
    """Put a built ``debian-12`` on a datastore (hard links where the filesystem allows: an image is
    only read); None when it was never built (it is optional: ``image build --kind debian``)."""
    if not debian_image_present(images_dir):
        return None
    source, target = images_dir / DEBIAN_IMAGE_NAME, datastore_path / "images" / DEBIAN_IMAGE_NAME
    if lab._read(target / FINGERPRINT_FILE) == lab._read(source / FINGERPRINT_FILE) and debian_image_present(
            datastore_path / "images"):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".debian-copy-", dir=target.parent) as tmp:
            staged = Path(tmp) / DEBIAN_IMAGE_NAME
            shutil.copytree(source, staged, copy_function=_link_or_copy)
            lab._replace_dir(staged, target)
    except OSError as exc:
        raise ImageError(f"Could not copy the {DEBIAN_IMAGE_NAME} image to {target}: {exc}.") from exc
    return target


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _customize(root: Path, daemon: Path, boot: Path) -> Path:
    """The guest's own files; returns a folder of the boot partition's files."""
    shutil.copy2(daemon, root / GUESTD.lstrip("/"))
    unit = root / "etc/systemd/system/vmshift-guestd.service"
    unit.write_text(GUESTD_UNIT)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "vmshift-guestd.service").unlink(missing_ok=True)
    (wants / "vmshift-guestd.service").symlink_to("/etc/systemd/system/vmshift-guestd.service")
    (root / "etc/cloud/cloud.cfg.d/05-vmshift-nocloud.cfg").write_text(CLOUD_CFG)
    (root / "etc/network/interfaces").write_text("auto lo\niface lo inet loopback\n\n"
                                                 "source /etc/network/interfaces.d/*\n")
    (root / "etc/hostname").write_text("debian\n")
    (root / "etc/machine-id").write_text("")  # each VM's systemd makes its own at first boot
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # cloud-init makes each VM's host keys (and so must: they would be shared)
    root_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"vmshift:{DEBIAN_IMAGE_NAME}:root"))
    (root / "etc/fstab").write_text(f"UUID={root_uuid} / ext4 errors=remount-ro 0 1\n")
    boot.mkdir()
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise ImageError("mmdebstrap installed no kernel or initramfs in /boot.",
                         hint="Check that linux-image-cloud-amd64 and initramfs-tools installed.")
    shutil.copyfile(kernels[-1], boot / "vmlinuz")
    shutil.copyfile(initrds[-1], boot / "initrd.img")
    (boot / "syslinux.cfg").write_text(syslinux_config(f"root=UUID={root_uuid} ro {CMDLINE}"))
    (boot / "root-uuid").write_text(root_uuid)
    return boot


def _du_mib(root: Path) -> int:
    total = sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    return -(-total // MIB)


def _write_disk(root: Path, boot: Path, raw: Path, say: Progress) -> int:
    root_uuid = (boot / "root-uuid").read_text()
    (boot / "root-uuid").unlink()
    root_mib = _du_mib(root) * 5 // 4 + ROOT_FREE_MIB  # ext4's metadata, then free room
    size_mib = BOOT_START_MIB + BOOT_MIB + root_mib
    say(f"writing a {size_mib} MiB disk: MBR, {BOOT_MIB} MiB FAT with SYSLINUX, ext4 root")
    with raw.open("wb") as f:
        f.truncate(size_mib * MIB)
    with raw.open("r+b") as f:
        f.write(mbr(MBR_BIN.read_bytes(), BOOT_MIB, root_mib))
    boot_at = f"{raw}@@{BOOT_START_MIB * MIB}"
    _tool(["mformat", "-i", boot_at, "-t", str(BOOT_MIB), "-h", "64", "-s", "32", "-H",
           str(BOOT_START_MIB * MIB // 512), "-v", "BOOT", "::"], "format the boot partition")
    _tool(["mcopy", "-i", boot_at, *(str(p) for p in sorted(boot.iterdir())), "::/"],
          "copy the kernel and initramfs onto the boot partition")
    _tool(["syslinux", "--offset", str(BOOT_START_MIB * MIB), "--install", str(raw)], "install SYSLINUX")
    root_offset = (BOOT_START_MIB + BOOT_MIB) * MIB
    _tool(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(root), "-U", root_uuid, "-L", "root",
           "-E", f"offset={root_offset}", str(raw), f"{root_mib}M"], "make the root filesystem")
    return size_mib


def _tool(cmd: list[str], what: str, hint: str | None = None) -> None:
    lab._run(cmd, what=what, hint=hint or "Install syslinux, mtools, e2fsprogs and qemu-utils "
             "(scripts/install-system.sh).")


def _fingerprint() -> str:
    h = hashlib.sha256()
    h.update(f"debian {DEBIAN_BUILDER_VERSION} {SUITE} {PACKAGES} {CMDLINE}\n".encode())
    h.update(GUESTD_UNIT.encode() + CLOUD_CFG.encode())
    for source in sorted(GUEST_SOURCES.glob("*.c")) + sorted(GUEST_SOURCES.glob("*.h")):
        h.update(source.read_bytes())
    return h.hexdigest()
