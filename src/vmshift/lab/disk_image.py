"""Build ``lab-disk``: the lab guest on a bootable disk, for VMs that boot from a disk image.

The disk is a FAT filesystem over the whole disk (no partition table) holding the lab guest's
kernel, an initramfs and a SYSLINUX configuration; ``syslinux --install`` writes the boot sector
and its loader into the image file through mtools, so no loop device or mount is needed. SeaBIOS
boots it like any disk. The initramfs is the lab guest's (``lab/image.py``: same daemon, so
``vmshift lab check`` works) plus the CD-ROM drivers and ``disk_guest/seed-init``, which reads
the VM's address and hostname from its cloud-init seed before the lab init runs: a disk image is
shared by many VMs, so the address cannot be on its kernel command line.

Cached like ``lab-guest``: skipped when the folder holds a build of the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from vmshift.errors import ImageError
from vmshift.lab import image as lab
from vmshift.lab.image import DEFAULT_CACHE_DIR, DEFAULT_IMAGES_DIR, FINGERPRINT_FILE, Progress

DISK_IMAGE_NAME = "lab-disk"
DISK_FILE = "disk.qcow2"
DISK_BUILDER_VERSION = "1"
SEED_INIT = Path(__file__).with_name("disk_guest") / "seed-init"
#: The seed's CD-ROM: virtio-scsi, the SCSI CD driver and ISO 9660 (qemu/cmdline.py attaches it).
SEED_MODULES = ("scsi_common", "scsi_mod", "virtio_scsi", "cdrom", "sr_mod", "isofs")
#: The lab init reads its vmshift.* arguments from the kernel command line; on the disk it also
#: reads the ones seed-init found (the only change to the lab guest's init).
_CMDLINE_READ = "$(cat /proc/cmdline)"
_CMDLINE_AND_SEED = "$(cat /proc/cmdline /etc/vmshift-seed.args 2>/dev/null)"
#: What lab-disk's guest runs from boot: a 16 MiB memory test (10 MiB/s), so every move of such a
#: VM can be checked for guest memory (``vmshift lab check``); its address comes from the seed.
WORKLOAD = "vmshift.memtest=16,10"
SLACK_MIB = 4  # free room on the FAT beyond its files (FAT tables, directories, ldlinux)
SYSLINUX_CFG = """DEFAULT lab
PROMPT 0
TIMEOUT 0
LABEL lab
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND {cmdline}
"""


def syslinux_config(cmdline: str) -> str:
    return SYSLINUX_CFG.format(cmdline=cmdline)


def fat_size_mib(file_sizes: list[int]) -> int:
    """MiB of a FAT that holds files of these sizes with room to spare."""
    return -(-sum(file_sizes) // (1 << 20)) + SLACK_MIB


def mformat_argv(image: Path, size_mib: int) -> list[str]:
    """Create ``image`` as a FAT of ``size_mib`` MiB: 64 heads x 32 sectors of 512 bytes = 1 MiB a
    cylinder; ``-C`` creates the file, ``-v`` its label."""
    return ["mformat", "-i", str(image), "-C", "-t", str(size_mib), "-h", "64", "-s", "32",
            "-v", "LABDISK", "::"]


def disk_image_present(images_dir: Path = DEFAULT_IMAGES_DIR) -> bool:
    folder = images_dir / DISK_IMAGE_NAME
    try:
        meta = json.loads((folder / "image.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("kind") == "disk" and (folder / DISK_FILE).is_file()


def build_disk_image(
    images_dir: Path = DEFAULT_IMAGES_DIR, *, force: bool = False, progress: Progress | None = None
) -> Path:
    """Build ``images_dir/lab-disk/{disk.qcow2, image.json}`` and return that folder."""
    say: Progress = progress or (lambda _msg: None)
    folder = images_dir / DISK_IMAGE_NAME
    cache = DEFAULT_CACHE_DIR
    lab._mkdirs(images_dir, cache)
    with lab._locked(cache / "disk-image-build.lock"):
        deb = lab._kernel_deb(cache / "kernel", say)
        fingerprint = _fingerprint(deb)
        built = lab._read(folder / FINGERPRINT_FILE) == fingerprint
        if not force and built and disk_image_present(images_dir):
            say(f"{DISK_IMAGE_NAME} is up to date")
            return folder
        kernel_root = lab._extract(deb, cache / "kernel", say)
        with tempfile.TemporaryDirectory(prefix=".lab-disk-build-", dir=images_dir) as tmp:
            work = Path(tmp)
            out = work / DISK_IMAGE_NAME
            out.mkdir()
            say("compiling vmshift-guestd")
            lab._compile_daemon(work / "vmshift-guestd")
            root = work / "root"
            say("assembling the initramfs")
            lab._assemble_root(root, kernel_root, work / "vmshift-guestd")
            _add_seed_reader(root, kernel_root)
            files = work / "files"
            files.mkdir()
            lab._write_initramfs(root, files / "initrd.img")
            shutil.copyfile(lab._find_vmlinuz(kernel_root), files / "vmlinuz")
            (files / "syslinux.cfg").write_text(syslinux_config(f"{lab.BASE_CMDLINE} {WORKLOAD}"))
            raw = work / "disk.raw"
            size_mib = fat_size_mib([p.stat().st_size for p in files.iterdir()])
            say(f"writing a {size_mib} MiB FAT disk with SYSLINUX")
            _tool(mformat_argv(raw, size_mib), "format the FAT disk")
            _tool(["mcopy", "-i", str(raw), *(str(p) for p in sorted(files.iterdir())), "::/"],
                  "copy the boot files onto the disk")
            _tool(["syslinux", "--install", str(raw)], "install SYSLINUX on the disk")
            _tool(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(out / DISK_FILE)],
                  "convert the disk to qcow2")
            meta = {"name": DISK_IMAGE_NAME, "kind": "disk", "disk": DISK_FILE, "disk_size_mib": size_mib}
            (out / "image.json").write_text(json.dumps(meta, indent=2) + "\n")
            (out / FINGERPRINT_FILE).write_text(fingerprint + "\n")
            lab._replace_dir(out, folder)
    say(f"{DISK_IMAGE_NAME} built in {folder}")
    return folder


def install_disk_image(images_dir: Path, datastore_path: Path) -> Path:
    """Copy the built ``lab-disk`` to ``datastore_path/images/lab-disk/`` (skipped if identical)."""
    if not disk_image_present(images_dir):
        raise ImageError(f"There is no built {DISK_IMAGE_NAME} image in {images_dir}.",
                         hint="Run `vmshift image build` first.")
    source = images_dir / DISK_IMAGE_NAME
    target = datastore_path / "images" / DISK_IMAGE_NAME
    if lab._read(target / FINGERPRINT_FILE) == lab._read(source / FINGERPRINT_FILE) and disk_image_present(
            datastore_path / "images"):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".lab-disk-copy-", dir=target.parent) as tmp:
            staged = Path(tmp) / DISK_IMAGE_NAME
            shutil.copytree(source, staged)
            lab._replace_dir(staged, target)
    except OSError as exc:
        raise ImageError(f"Could not copy the {DISK_IMAGE_NAME} image to {target}: {exc}.") from exc
    return target


def _add_seed_reader(root: Path, kernel_root: Path) -> None:
    """The CD-ROM modules, seed-init as /init, the lab init (reading seed-init's arguments) as
    /sbin/lab-init."""
    init = (root / "init").read_text()
    if _CMDLINE_READ not in init:
        raise ImageError("The lab guest's init no longer reads $(cat /proc/cmdline), so lab-disk cannot "
                         "pass it the seed's address.", hint="Update lab/disk_image.py with the init.")
    (root / "sbin" / "lab-init").write_text(init.replace(_CMDLINE_READ, _CMDLINE_AND_SEED, 1))
    (root / "sbin" / "lab-init").chmod(0o755)
    shutil.copyfile(SEED_INIT, root / "init")
    (root / "init").chmod(0o755)
    modules = lab._find_modules(kernel_root, SEED_MODULES)
    for ko in modules:
        shutil.copyfile(ko, root / "lib" / "modules" / ko.name)
    order = "".join(ko.name.removesuffix(".ko") + "\n" for ko in modules)
    (root / "lib" / "modules" / "seed-load-order").write_text(order)


def _tool(cmd: list[str], what: str) -> None:
    lab._run(cmd, what=what, hint="Install syslinux, mtools and qemu-utils (scripts/install-system.sh).")


def _fingerprint(deb: Path) -> str:
    h = hashlib.sha256()
    h.update(f"lab-disk {DISK_BUILDER_VERSION}\n{lab._fingerprint(deb)}\n{SEED_MODULES}\n".encode())
    h.update(SEED_INIT.read_bytes())
    h.update(SYSLINUX_CFG.encode() + WORKLOAD.encode())
    return h.hexdigest()
