"""Build and install the lab guest image ``lab-guest``.

The image is a Debian cloud kernel plus a gzip'd cpio initramfs holding busybox (static), the
virtio/ACPI modules, the init script and ``vmshift-guestd`` (static C, see ``lab/guest/``). No disk
image and no distribution install: it boots to a ready workload in seconds under TCG, and its
state lives in RAM, which is exactly what a live migration has to move.

Downloads are cached under ``/var/cache/vmshift``; a build is skipped when the image folder
already holds a build of the same inputs (kernel package, busybox, guest sources, this builder).
"""

from __future__ import annotations

import contextlib
import fcntl
import filecmp
import gzip
import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from vmshift.errors import ImageError

IMAGE_NAME = "lab-guest"
DEFAULT_IMAGES_DIR = Path("/var/lib/vmshift/images")
DEFAULT_CACHE_DIR = Path("/var/cache/vmshift")
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")
APT_LISTS = Path("/var/lib/apt/lists")
GUEST_SOURCES = Path(__file__).with_name("guest")
HTTP_PAGE = "index.html"  # in GUEST_SOURCES; the guest serves it as / on TCP 80
# Dependencies first; button + evdev give acpid the power button's input events.
MODULE_LOAD_ORDER = (
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "failover", "net_failover", "virtio_net", "virtio_blk", "button", "evdev",
)  # fmt: skip
BASE_CMDLINE = "console=ttyS0 quiet panic=-1 8250.nr_uarts=1 i8042.noaux cryptomgr.notests"
FINGERPRINT_FILE = ".build-fingerprint"
BUILDER_VERSION = "2"

Progress = Callable[[str], None]


def kernel_args(
    ip: str | None = None,
    gateway: str | None = None,
    memtest: tuple[int, int] | tuple[int, int, int] | None = None,
    disklog: bool = False,
    httpd: bool = False,
) -> str:
    """The ``vmshift.*`` kernel arguments the guest's init understands (appended to the image cmdline).

    ``ip`` is ``ADDR/PREFIX``; ``memtest`` is ``(size_mib, rate_mibps[, threads])`` with rate 0 = flat
    out; ``httpd`` serves the static page on TCP 80.
    """
    args = []
    if ip:
        args.append(f"vmshift.ip={ip}")
    if gateway:
        args.append(f"vmshift.gw={gateway}")
    if memtest:
        args.append("vmshift.memtest=" + ",".join(str(n) for n in memtest))
    if disklog:
        args.append("vmshift.disklog=1")
    if httpd:
        args.append("vmshift.httpd=1")
    return " ".join(args)


def image_present(images_dir: Path = DEFAULT_IMAGES_DIR) -> bool:
    """True when ``images_dir/lab-guest`` holds a complete image (image.json and the files it names)."""
    folder = images_dir / IMAGE_NAME
    try:
        meta = json.loads((folder / "image.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(meta, dict)
        and meta.get("name") == IMAGE_NAME
        and all((folder / str(meta.get(key, ""))).is_file() for key in ("kernel", "initrd"))
    )


def build_image(
    images_dir: Path = DEFAULT_IMAGES_DIR, *, force: bool = False, progress: Progress | None = None
) -> Path:
    """Build ``images_dir/lab-guest/{vmlinuz, initrd.img, image.json}`` and return that folder.

    Skips the work when the folder holds a build of the same inputs, unless ``force``.
    """
    say: Progress = progress or (lambda _msg: None)
    folder = images_dir / IMAGE_NAME
    cache = DEFAULT_CACHE_DIR
    _mkdirs(images_dir, cache)
    with _locked(cache / "image-build.lock"):
        deb = _kernel_deb(cache / "kernel", say)
        fingerprint = _fingerprint(deb)
        if not force and image_present(images_dir) and _read(folder / FINGERPRINT_FILE) == fingerprint:
            say(f"{IMAGE_NAME} is up to date")
            return folder
        kernel_root = _extract(deb, cache / "kernel", say)
        with tempfile.TemporaryDirectory(prefix=".lab-guest-build-", dir=images_dir) as tmp:
            work = Path(tmp)
            out = work / IMAGE_NAME
            out.mkdir()
            root = work / "root"
            say("compiling vmshift-guestd")
            _compile_daemon(work / "vmshift-guestd")
            say("assembling the initramfs")
            _assemble_root(root, kernel_root, work / "vmshift-guestd")
            _write_initramfs(root, out / "initrd.img")
            shutil.copyfile(_find_vmlinuz(kernel_root), out / "vmlinuz")
            meta = {
                "name": IMAGE_NAME, "kind": "kernel", "kernel": "vmlinuz",
                "initrd": "initrd.img", "cmdline": BASE_CMDLINE,
            }  # fmt: skip
            (out / "image.json").write_text(json.dumps(meta, indent=2) + "\n")
            (out / FINGERPRINT_FILE).write_text(fingerprint + "\n")
            _replace_dir(out, folder)
    say(f"{IMAGE_NAME} built in {folder}")
    return folder


def install_image(images_dir: Path, datastore_path: Path) -> Path:
    """Copy the built image to ``datastore_path/images/lab-guest/`` (skipped if identical); return it.

    ``images_dir`` may be the images directory or the ``lab-guest`` folder itself (what
    ``build_image`` returns).
    """
    source = images_dir if (images_dir / "image.json").is_file() else images_dir / IMAGE_NAME
    if source.name != IMAGE_NAME or not image_present(source.parent):
        raise ImageError(
            f"There is no built {IMAGE_NAME} image in {images_dir}.", hint="Run `vmshift image build` first."
        )
    if not datastore_path.is_dir():
        raise ImageError(f"The datastore directory {datastore_path} does not exist.")
    target = datastore_path / "images" / IMAGE_NAME
    names = sorted(p.name for p in source.iterdir() if p.is_file())
    if target.is_dir() and sorted(p.name for p in target.iterdir()) == names:
        _, mismatch, errors = filecmp.cmpfiles(source, target, names, shallow=False)
        if not mismatch and not errors:
            return target
    try:
        (target.parent).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".lab-guest-copy-", dir=target.parent) as tmp:
            staged = Path(tmp) / IMAGE_NAME
            shutil.copytree(source, staged)
            _replace_dir(staged, target)
    except OSError as exc:
        raise ImageError(f"Could not copy the {IMAGE_NAME} image to {target}: {exc}.") from exc
    return target


# --- kernel ------------------------------------------------------------------------------------


def _kernel_deb(cache: Path, say: Progress) -> Path:
    """The cached .deb of the kernel the cloud meta-package depends on; downloaded when missing."""
    cache.mkdir(parents=True, exist_ok=True)
    try:
        package, version = _resolve_kernel(cache / "resolved.json")
    except ImageError:
        cached = sorted(cache.glob("linux-image-*-cloud-amd64_*.deb"))
        if cached:  # offline, or apt lists gone: reuse the newest download
            return cached[-1]
        raise
    deb = cache / f"{package}_{version.replace(':', '%3a')}_amd64.deb"
    if not deb.is_file():
        say(f"downloading {package} {version}")
        _run(["apt-get", "download", f"{package}={version}"], cwd=cache, what=f"download {package}")
        if not deb.is_file():
            found = sorted(cache.glob(f"{package}_*.deb"))
            if not found:
                raise ImageError(f"apt-get download left no {package} package in {cache}.")
            deb = found[-1]
    return deb


def _resolve_kernel(memo: Path) -> tuple[str, str]:
    """(package, version) the meta-package depends on, remembered until the apt lists change.

    apt-cache takes seconds per call without a package cache, so the answer is kept in ``memo``.
    """
    try:
        lists_stamp = str(APT_LISTS.stat().st_mtime_ns)
    except OSError:
        lists_stamp = ""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(memo.read_text())
        if lists_stamp and saved["lists"] == lists_stamp:
            return str(saved["package"]), str(saved["version"])
    what = f"look up {KERNEL_META_PACKAGE}"
    out = _run(["apt-cache", "show", "--no-all-versions", KERNEL_META_PACKAGE], what=what)
    depends = next((ln.split(":", 1)[1] for ln in out.splitlines() if ln.startswith("Depends:")), "")
    first = next((d.strip() for d in depends.split(",") if d.strip().startswith("linux-image-")), "")
    if not first:
        raise ImageError(
            f"{KERNEL_META_PACKAGE} depends on no linux-image package in the apt lists.",
            hint="Run `apt-get update` and check the Debian sources.",
        )
    package, _, constraint = first.partition(" ")
    version = constraint.strip("()").removeprefix("=").strip()
    if not version:
        out = _run(["apt-cache", "show", "--no-all-versions", package], what=f"look up {package}")
        version = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Version:")), ""
        )
        if not version:
            raise ImageError(f"apt-cache shows no version of {package}.")
    with contextlib.suppress(OSError):
        memo.write_text(json.dumps({"lists": lists_stamp, "package": package, "version": version}) + "\n")
    return package, version


def _extract(deb: Path, cache: Path, say: Progress) -> Path:
    root = cache / deb.name.removesuffix(".deb")
    done = root / ".extracted"
    if not done.is_file():
        say(f"unpacking {deb.name}")
        shutil.rmtree(root, ignore_errors=True)
        _run(["dpkg-deb", "-x", str(deb), str(root)], what=f"unpack {deb.name}")
        done.write_text("ok\n")
    return root


def _find_vmlinuz(kernel_root: Path) -> Path:
    found = sorted((kernel_root / "boot").glob("vmlinuz-*"))
    if not found:
        raise ImageError(f"The kernel package unpacked in {kernel_root} holds no boot/vmlinuz-*.")
    return found[-1]


def _find_modules(kernel_root: Path, names: tuple[str, ...] = MODULE_LOAD_ORDER) -> list[Path]:
    """The .ko files of ``names`` to load, in load order; modules built into this kernel are skipped."""
    trees = sorted((kernel_root / "lib" / "modules").glob("*/kernel"))
    if not trees:
        raise ImageError(f"The kernel package unpacked in {kernel_root} holds no lib/modules/*/kernel.")
    by_name = {p.name.removesuffix(".ko"): p for p in trees[-1].rglob("*.ko")}
    builtin = _read(trees[-1].parent / "modules.builtin")
    modules = []
    for name in names:
        if name in by_name:
            modules.append(by_name[name])
        elif f"/{name}.ko" not in builtin:
            raise ImageError(f"The kernel has no module {name} and does not build it in.")
    return modules


# --- initramfs ---------------------------------------------------------------------------------


def _compile_daemon(out: Path) -> None:
    sources = sorted(str(p) for p in GUEST_SOURCES.glob("*.c"))
    cmd = ["gcc", "-static", "-O2", "-pthread", "-Wall", "-o", str(out), *sources]
    _run(cmd, what="compile vmshift-guestd", hint="Install gcc and libc6-dev.")


def _assemble_root(root: Path, kernel_root: Path, daemon: Path) -> None:
    if not BUSYBOX.is_file() or _is_dynamic(BUSYBOX):
        raise ImageError(f"{BUSYBOX} is missing or not static.", hint="apt-get install busybox-static")
    for sub in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "lib" / "modules").mkdir(parents=True)
    applets = _run([str(BUSYBOX), "--list-full"], what="list busybox applets").split()
    for applet in applets:
        link = root / applet
        if not link.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    # After the links: one of them may be bin/busybox itself, which the copy must replace.
    (root / "bin" / "busybox").unlink(missing_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    shutil.copy2(daemon, root / "sbin" / "vmshift-guestd")
    for name, dest in (("init", "init"), ("udhcpc.script", "etc/udhcpc.script")):
        shutil.copyfile(GUEST_SOURCES / name, root / dest)
        (root / dest).chmod(0o755)
    (root / "www").mkdir()
    shutil.copyfile(GUEST_SOURCES / HTTP_PAGE, root / "www" / "index.html")  # served by vmshift.httpd=1
    modules = _find_modules(kernel_root)
    for ko in modules:
        shutil.copyfile(ko, root / "lib" / "modules" / ko.name)
    order = "".join(ko.name.removesuffix(".ko") + "\n" for ko in modules)
    (root / "lib" / "modules" / "load-order").write_text(order)
    # The kernel opens /dev/console for init's stdio before devtmpfs is mounted; without root
    # privileges there is no node, and init re-opens the console once devtmpfs is up.
    with contextlib.suppress(OSError):
        os.mknod(root / "dev" / "console", stat.S_IFCHR | 0o600, os.makedev(5, 1))


def _write_initramfs(root: Path, out: Path) -> None:
    """newc cpio of ``root`` (owned by root:root, sorted), gzip'd with a fixed mtime."""
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    listing = ("\n".join([".", *names]) + "\n").encode()
    try:
        proc = subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
            cwd=root, input=listing, capture_output=True, check=True,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ImageError("cpio could not pack the initramfs.", hint="apt-get install cpio") from exc
    with gzip.GzipFile(out, "wb", compresslevel=6, mtime=0) as gz:
        gz.write(proc.stdout)


# --- helpers -----------------------------------------------------------------------------------


def _fingerprint(deb: Path) -> str:
    h = hashlib.sha256()
    h.update(f"builder {BUILDER_VERSION}\n{deb.name}\n{BASE_CMDLINE}\n{MODULE_LOAD_ORDER}\n".encode())
    for path in [BUSYBOX, *sorted(p for p in GUEST_SOURCES.iterdir() if p.is_file())]:
        h.update(path.name.encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def _is_dynamic(elf: Path) -> bool:
    """True when the 64-bit ELF has a PT_INTERP header (needs a dynamic loader)."""
    data = elf.read_bytes()
    if data[:5] != b"\x7fELF\x02":
        return True
    phoff, = struct.unpack_from("<Q", data, 0x20)  # fmt: skip
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return any(struct.unpack_from("<I", data, phoff + i * phentsize)[0] == 3 for i in range(phnum))


def _replace_dir(new: Path, dest: Path) -> None:
    """Move ``new`` to ``dest``, swapping out an existing folder with two renames."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        dest.rename(old)
    new.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def _mkdirs(*dirs: Path) -> None:
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ImageError(f"Cannot create {d}: {exc.strerror}.", hint="Run as root.") from exc


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    """Serialises builds (several tests or lab commands may build at once)."""
    with lock.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _run(cmd: list[str], *, what: str, cwd: Path | None = None, hint: str | None = None,
         input_text: str | None = None) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False, input=input_text)
    except OSError as exc:
        raise ImageError(f"Could not {what}: {cmd[0]} is not runnable ({exc.strerror}).", hint=hint) from exc
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ImageError(f"Could not {what}: {cmd[0]} failed ({detail}).", hint=hint)
    return proc.stdout
