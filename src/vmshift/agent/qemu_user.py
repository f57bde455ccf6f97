"""Who QEMU runs as, and the files prepared for it (docs/confinement.md).

The agent (root) starts QEMU already as the unprivileged ``qemu_user`` (subprocess ``user=``,
``group=``, ``extra_groups=``), the way libvirt does; never with QEMU's own ``-runas``, which the
sandbox's ``elevateprivileges=deny`` forbids. QEMU then touches only what the agent hands it: the
listening QMP socket and the taps as inherited file descriptors, and by path the VM's folder, disks
and state file, which the agent makes that user's (0600) before QEMU opens them. The VM's folders stay
root's, searchable by QEMU's group only (0710), so QEMU can open its own files there but cannot
create, rename or delete any file (vm.json, the serial log) in them.

Where the user does not exist, or cannot use the accelerator, QEMU runs as root and the agent says
so once in its log and in its host facts (``qemu_user`` empty).
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmshift.errors import ConflictError
from vmshift.model.enums import Accelerator
from vmshift.qemu.cmdline import KernelBoot, VmPaths

log = logging.getLogger(__name__)

KVM_DEVICE = Path("/dev/kvm")
KVM_GROUP = "kvm"
USERFAULTFD_DEVICE = Path("/dev/userfaultfd")
UNPRIVILEGED_USERFAULTFD = Path("/proc/sys/vm/unprivileged_userfaultfd")
FILE_MODE = 0o600
DIR_MODE = 0o700  # the VM's folders when QEMU runs as root
CONFINED_DIR_MODE = 0o710  # root's, QEMU's group may only pass through


@dataclass(frozen=True)
class QemuIdentity:
    """The user QEMU runs as; ``user`` None means root (not confined), ``why_root`` says why."""

    user: str | None = None
    uid: int = 0
    gid: int = 0
    groups: list[int] = field(default_factory=list)
    why_root: str = ""

    @property
    def confined(self) -> bool:
        return self.user is not None

    def popen_kwargs(self) -> dict[str, Any]:
        """What ``subprocess.Popen`` needs to start QEMU as this user (nothing for root)."""
        if self.user is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}

    def own_file(self, path: Path) -> None:
        """A file QEMU opens read-write (a disk, the state file): this user's, 0600."""
        if self.user is not None:
            os.chown(path, self.uid, self.gid, follow_symlinks=False)
        os.chmod(path, FILE_MODE)

    def own_dir(self, path: Path) -> None:
        """A folder QEMU opens files in: root's; with a confined QEMU its group may pass through."""
        if self.user is not None:
            os.chown(path, 0, self.gid, follow_symlinks=False)
            os.chmod(path, CONFINED_DIR_MODE)
        else:
            os.chmod(path, DIR_MODE)

    def create_file(self, path: Path) -> None:
        """An empty file QEMU will write (the suspend state): QEMU cannot create files itself."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        os.close(fd)
        self.own_file(path)

    def can_search(self, folder: Path) -> bool:
        """Can this user pass through ``folder`` (by its mode bits)?"""
        if self.user is None:
            return True
        try:
            st = folder.stat()
        except OSError:
            return False
        if st.st_uid == self.uid:
            return bool(st.st_mode & stat.S_IXUSR)
        if st.st_gid == self.gid or st.st_gid in self.groups:
            return bool(st.st_mode & stat.S_IXGRP)
        return bool(st.st_mode & stat.S_IXOTH)

    def can_read(self, path: Path) -> bool:
        if self.user is None:
            return True
        try:
            st = path.stat()
        except OSError:
            return False
        if st.st_uid == self.uid:
            return bool(st.st_mode & stat.S_IRUSR)
        if st.st_gid == self.gid or st.st_gid in self.groups:
            return bool(st.st_mode & stat.S_IRGRP)
        return bool(st.st_mode & stat.S_IROTH)


def unreachable(identity: QemuIdentity, path: Path) -> Path | None:
    """The first folder above ``path`` that ``identity`` cannot pass through, None if all can."""
    for folder in reversed(path.parents):
        if not identity.can_search(folder):
            return folder
    return None


def prepare_vm_files(identity: QemuIdentity, paths: VmPaths, kernel: KernelBoot | None,
                     reads: Sequence[Path] = ()) -> None:
    """Before QEMU starts: the VM's folders and files as QEMU needs them, or a clear refusal.

    Files that other steps created as root (a cold move's copies, a relocate's new disks, a state
    file copied with the VM) become QEMU's here, whichever step made them. ``reads`` are files QEMU
    only reads and that are not the VM's own (the images backing its disks): they must be readable."""
    folders = [paths.vm_dir, *(d.parent for d in paths.disks if d.parent != paths.vm_dir)]
    for folder in dict.fromkeys(folders):
        blocked = unreachable(identity, folder)
        if blocked is not None:
            raise ConflictError(
                f"QEMU runs as {identity.user!r}, which cannot pass through {blocked} to reach {folder}.",
                hint=f"Let it through (chmod o+x {blocked}), or set qemu_user to \"\" in the agent config "
                     "to run QEMU as root.")
        identity.own_dir(folder)
    for path in (*paths.disks, paths.suspend_state, paths.seed_iso):
        with contextlib.suppress(FileNotFoundError):  # a missing disk: QEMU's own error says which
            identity.own_file(path)
    boot_files = [kernel.kernel, kernel.initrd] if kernel is not None else []
    for boot_file in (*boot_files, *reads):
        if boot_file is not None and not (identity.can_read(boot_file)
                                          and unreachable(identity, boot_file) is None):
            raise ConflictError(f"QEMU runs as {identity.user!r}, which cannot read {boot_file}.",
                                hint="Make the image's files world-readable (chmod -R o+rX the image "
                                     "folder), or set qemu_user to \"\" to run QEMU as root.")


def _device_usable(device: Path, uid: int, groups: set[int]) -> bool:
    """Can ``uid`` with ``groups`` open ``device`` read-write (by its mode bits)?"""
    try:
        st = device.stat()
    except OSError:
        return False
    rw = stat.S_IRUSR | stat.S_IWUSR
    if st.st_uid == uid and st.st_mode & rw == rw:
        return True
    if st.st_gid in groups and st.st_mode & (stat.S_IRGRP | stat.S_IWGRP) == stat.S_IRGRP | stat.S_IWGRP:
        return True
    return st.st_mode & (stat.S_IROTH | stat.S_IWOTH) == stat.S_IROTH | stat.S_IWOTH


def resolve(user: str, accelerator: Accelerator, *, grant_devices: bool = True) -> QemuIdentity:
    """The identity for the configured ``qemu_user`` ("" asks for root) on this host, logged once;
    ``grant_devices`` may give the user ``/dev/userfaultfd`` (see :func:`grant_userfaultfd`)."""
    if not user:
        identity = QemuIdentity(why_root="the agent config sets qemu_user to \"\"")
    else:
        identity = _lookup(user, accelerator, grant_devices)
    if identity.confined:
        log.info("QEMU runs as %s (uid %d, gid %d) under its seccomp sandbox",
                 identity.user, identity.uid, identity.gid)
    else:
        log.warning("QEMU runs as root (only its seccomp sandbox confines it): %s", identity.why_root)
    return identity


def _lookup(user: str, accelerator: Accelerator, grant_devices: bool) -> QemuIdentity:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return QemuIdentity(why_root=f"user {user!r} does not exist on this host "
                                     f"(create it: useradd --system --no-create-home "
                                     f"--shell /usr/sbin/nologin {user})")
    if entry.pw_uid == 0:
        return QemuIdentity(why_root=f"user {user!r} is root")
    groups = {g.gr_gid for g in grp.getgrall() if user in g.gr_mem and g.gr_gid != entry.pw_gid}
    with contextlib.suppress(KeyError):
        if accelerator is Accelerator.KVM:
            groups.add(grp.getgrnam(KVM_GROUP).gr_gid)
    if accelerator is Accelerator.KVM and not _device_usable(KVM_DEVICE, entry.pw_uid,
                                                             groups | {entry.pw_gid}):
        return QemuIdentity(why_root=f"user {user!r} cannot open {KVM_DEVICE} (make it root:{KVM_GROUP} "
                                     "0660, as Debian's udev rule does)")
    all_groups = groups | {entry.pw_gid}
    why_not = grant_userfaultfd(user, entry.pw_uid, entry.pw_gid, all_groups) if grant_devices else ""
    if why_not:
        return QemuIdentity(why_root=why_not)
    return QemuIdentity(user=user, uid=entry.pw_uid, gid=entry.pw_gid, groups=sorted(groups))


def grant_userfaultfd(user: str, uid: int, gid: int, groups: set[int]) -> str:
    """Let ``user`` create userfaultfds, or say why not ("" when it can).

    Every live migration turns QEMU's ``postcopy-ram`` on on both sides (the target always, to be
    able to switch to post-copy), and QEMU checks then that it can register its RAM with a
    userfaultfd. An unprivileged process may not (``vm.unprivileged_userfaultfd`` is 0 by default)
    except through ``/dev/userfaultfd``, root's 0600: the agent gives the device to QEMU's group
    (root:vmshift-qemu 0660) as libvirt grants QEMU an ACL on it. A device someone already gave to
    another group is left alone."""
    try:
        if UNPRIVILEGED_USERFAULTFD.read_text().strip() == "1":
            return ""
    except OSError:
        pass
    if _device_usable(USERFAULTFD_DEVICE, uid, groups):
        return ""
    try:
        st = USERFAULTFD_DEVICE.stat()
    except OSError:
        return (f"user {user!r} could not use post-copy or live migration: this kernel has no "
                f"{USERFAULTFD_DEVICE} and vm.unprivileged_userfaultfd is 0 (set it to 1)")
    if st.st_gid != 0:
        return (f"user {user!r} cannot open {USERFAULTFD_DEVICE} (group {st.st_gid}), which live migration "
                f"needs (add {user} to that group, or make it root:{user} 0660)")
    try:
        os.chown(USERFAULTFD_DEVICE, st.st_uid, gid)
        os.chmod(USERFAULTFD_DEVICE, 0o660)
    except OSError as exc:
        return f"user {user!r} cannot open {USERFAULTFD_DEVICE}, which live migration needs ({exc.strerror})"
    log.info("gave %s to group %s (root:%s 0660) for post-copy", USERFAULTFD_DEVICE, user, user)
    return ""
