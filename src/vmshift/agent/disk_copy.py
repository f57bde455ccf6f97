"""Copying a stopped VM's images with ``qemu-img``: convert (with progress), compare, info, create.

A cold or suspended move copies each image with ``qemu-img convert -n -W -m 16`` into a target
that was just created (a file on a datastore of this host, or another host's NBD export), so the
target reads as zeros and ``--target-is-zero`` lets qemu-img skip every zero area of the source:
a sparse disk copies in the time of its data. The copy is then checked with ``qemu-img compare``.

The argv builders and the progress parser are pure (unit-tested); the runners map qemu-img's
failures into the error tree with one sentence, ENOSPC on the target recognised.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmshift.errors import CapacityError, NotFoundError, QemuError
from vmshift.model.enums import DiskFormat

log = logging.getLogger(__name__)

CONVERT_PARALLEL = 16  # -m: coroutines in flight (issue 8 names 16)
KILL_GRACE_S = 5.0
_PROGRESS_RE = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")
_NO_SPACE = ("No space left on device", "ENOSPC")
_NBD_GONE = ("Connection refused", "Connection reset", "Broken pipe", "Failed to connect",
             "Requested export not available", "server reported: export", "Input/output error")

ProgressCallback = Callable[[float], None]
"""Called with the share of the copy done, 0.0 to 1.0, each time qemu-img reports progress."""


def is_nbd(location: str) -> bool:
    return location.startswith(("nbd://", "nbd+unix://", "nbd:"))


@dataclass(frozen=True)
class Image:
    """One end of a copy: a host file (``fmt`` its format) or an NBD URI (always ``raw`` on the wire:
    the format of the file behind the export is the exporter's business)."""

    location: str
    fmt: DiskFormat

    @classmethod
    def nbd(cls, uri: str) -> Image:
        return cls(uri, DiskFormat.RAW)

    @property
    def over_nbd(self) -> bool:
        return is_nbd(self.location)


@dataclass(frozen=True)
class ImageInfo:
    fmt: DiskFormat
    virtual_size: int
    actual_size: int
    backing: str | None = None


# ----- pure: argv and output parsing ----------------------------------------------------------
def convert_argv(qemu_img: str, source: Image, target: Image, *, target_is_zero: bool = True,
                 parallel: int = CONVERT_PARALLEL, rate_bps: float | None = None) -> list[str]:
    """``qemu-img convert`` into an existing target (``-n``), out-of-order writes (``-W``).

    ``target_is_zero`` (a target created just before) skips the zero areas of the source; without
    it ``-S 4k`` still keeps zero areas of the source unallocated on the target. The target is
    opened ``writeback`` so qemu-img flushes it at the end (its default, ``unsafe``, never does:
    the source may be deleted right after). The source is opened without ``-U``: while the copy
    runs, QEMU's image locking keeps anyone from writing the source.
    """
    argv = [qemu_img, "convert", "-p", "-n", "-W", "-m", str(parallel), "-t", "writeback",
            "-f", source.fmt.value, "-O", target.fmt.value]
    argv += ["--target-is-zero"] if target_is_zero else ["-S", "4k"]
    if rate_bps is not None:  # the move's bandwidth limit (I/O bytes per second)
        argv += ["-r", str(int(rate_bps))]
    return [*argv, source.location, target.location]


def compare_argv(qemu_img: str, source: Image, copy: Image) -> list[str]:
    """``qemu-img compare`` (not strict: allocation may differ, e.g. qcow2 to raw; a copy larger than its
    source is equal when the extra bytes are zeros). ``-U`` on the source: another reader may hold it."""
    return [qemu_img, "compare", "-U", "-f", source.fmt.value, "-F", copy.fmt.value,
            source.location, copy.location]


def info_argv(qemu_img: str, path: str) -> list[str]:
    return [qemu_img, "info", "--output=json", "-U", path]


def create_argv(qemu_img: str, path: str, fmt: DiskFormat, size_bytes: int) -> list[str]:
    return [qemu_img, "create", "-q", "-f", fmt.value, path, str(size_bytes)]


def parse_progress(text: str) -> list[float]:
    """Every ``(NN.NN/100%)`` in a chunk of qemu-img's output, as shares 0.0 to 1.0, in order."""
    return [min(1.0, max(0.0, round(float(m) / 100.0, 6))) for m in _PROGRESS_RE.findall(text)]


class ProgressReader:
    """Feeds qemu-img's output chunk by chunk (its progress lines end in ``\\r``, so a line may be cut
    between two reads) and reports each new share to ``callback``."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.latest = 0.0
        self._partial = ""

    def feed(self, chunk: str) -> None:
        text = self._partial + chunk
        cut = max(text.rfind("\r"), text.rfind("\n"))
        complete, self._partial = (text[:cut + 1], text[cut + 1:]) if cut >= 0 else ("", text)
        if len(self._partial) > 4096:  # not a progress line: drop it
            self._partial = ""
        for share in parse_progress(complete):
            self.latest = max(self.latest, share)
            if self.callback is not None:
                self.callback(self.latest)


def convert_failure(what: str, target: str, returncode: int, stderr: str) -> QemuError | CapacityError:
    """The error for a failed convert: ENOSPC, a vanished NBD export, a killed process, or the rest."""
    last = _last_line(stderr)
    if any(s in stderr for s in _NO_SPACE):
        return CapacityError(f"The target of {what} ({target}) ran out of space while copying.",
                             hint="Free space on the target datastore or move to another one; "
                                  "the partial copy is removed.")
    if returncode < 0:
        name = _signal_name(-returncode)
        return QemuError(f"The copy of {what} was stopped: qemu-img was killed by {name}.",
                         hint="Start the move again; the VM's original files are untouched.")
    if is_nbd(target) and any(s in stderr for s in _NBD_GONE):
        return QemuError(f"The NBD export {target} of {what} went away during the copy ({last}).",
                         hint="Check that the target agent and its migration network are up, then start the "
                              "move again.")
    return QemuError(f"qemu-img could not copy {what} to {target}: {last}.",
                     hint="Check the source image and the target datastore, then start the move again.")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    line = lines[-1] if lines else "no message"
    return line.removeprefix("qemu-img: ").rstrip(".")[:300]


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


# ----- I/O: running qemu-img -------------------------------------------------------------------
async def _stop(proc: asyncio.subprocess.Process) -> None:
    """End a qemu-img we started (SIGTERM, SIGKILL after a grace period) and reap it."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), KILL_GRACE_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def _run(argv: list[str]) -> tuple[int, str, str]:
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise QemuError(f"{argv[0]} cannot be run ({exc.strerror}).",
                        hint="Install qemu-utils or set 'qemu_img' in the agent config.") from exc
    try:
        out, err = await proc.communicate()
    except asyncio.CancelledError:
        await _stop(proc)
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def convert(qemu_img: str, source: Image, target: Image, *, what: str,
                  on_progress: ProgressCallback | None = None, target_is_zero: bool = True,
                  on_start: Callable[[int], None] | None = None, rate_bps: float | None = None) -> None:
    """Copy ``source`` into the existing ``target``; ``what`` names the image in errors ("disk 0 of
    VM web-3"). Cancelling the awaiting task kills qemu-img and waits for it, so no copy outlives its
    job. ``on_start`` gets qemu-img's pid (a job may record it)."""
    argv = convert_argv(qemu_img, source, target, target_is_zero=target_is_zero, rate_bps=rate_bps)
    log.info("copying %s: %s", what, " ".join(argv))
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise QemuError(f"{qemu_img} cannot be run ({exc.strerror}).",
                        hint="Install qemu-utils or set 'qemu_img' in the agent config.") from exc
    if on_start is not None:
        on_start(proc.pid)
    reader = ProgressReader(on_progress)
    assert proc.stdout is not None and proc.stderr is not None
    stdout, stderr = proc.stdout, proc.stderr

    async def pump() -> None:
        while chunk := await stdout.read(4096):
            reader.feed(chunk.decode(errors="replace"))

    try:
        _, err = await asyncio.gather(pump(), stderr.read())
        await proc.wait()
    except asyncio.CancelledError:
        await _stop(proc)
        raise
    assert proc.returncode is not None
    if proc.returncode != 0:
        raise convert_failure(what, target.location, proc.returncode, err.decode(errors="replace"))
    if on_progress is not None:
        on_progress(1.0)


async def compare(qemu_img: str, source: Image, copy: Image, *, what: str) -> bool:
    """True if ``copy`` holds the same data as ``source`` (qemu-img compare exit 0, 1 = differs)."""
    code, out, err = await _run(compare_argv(qemu_img, source, copy))
    if code in (0, 1):
        if code == 1:
            log.warning("%s differs from its copy %s: %s", what, copy.location, _last_line(out))
        return code == 0
    raise QemuError(f"qemu-img could not compare {what} with its copy {copy.location}: {_last_line(err)}.",
                    hint="Check that both images are readable, then start the move again.")


async def image_info(qemu_img: str, path: Path) -> ImageInfo:
    """Format and sizes of an image file (NotFoundError if it is missing)."""
    if not path.exists():
        raise NotFoundError(f"The image {path} does not exist.", hint="Check the VM's datastore and spec.")
    code, out, err = await _run(info_argv(qemu_img, str(path)))
    if code != 0:
        raise QemuError(f"qemu-img cannot read the image {path}: {_last_line(err)}.",
                        hint="Check the file; it may be damaged or not an image.")
    try:
        data = json.loads(out)
        fmt = DiskFormat(data["format"])
        return ImageInfo(fmt=fmt, virtual_size=int(data["virtual-size"]),
                         actual_size=int(data.get("actual-size", 0)),
                         backing=data.get("full-backing-filename") or data.get("backing-filename"))
    except (ValueError, KeyError, TypeError) as exc:
        raise QemuError(f"The image {path} has a format vmshift does not copy ({exc}).",
                        hint="Only qcow2 and raw images can be moved.") from exc


async def create_image(qemu_img: str, path: Path, fmt: DiskFormat, size_bytes: int) -> None:
    """A new empty image (it reads as zeros, so a convert into it may use ``--target-is-zero``)."""
    code, _, err = await _run(create_argv(qemu_img, str(path), fmt, size_bytes))
    if code != 0:
        if any(s in err for s in _NO_SPACE):
            raise CapacityError(f"The datastore has no room to create {path}.",
                                hint="Free space on the target datastore or move to another one.")
        raise QemuError(f"qemu-img could not create {path}: {_last_line(err)}.",
                        hint="Check the target datastore's free space and permissions.")
