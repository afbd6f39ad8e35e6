"""A task's directory (its OCI bundle) under <state>/io.containerd.runtime.v2.task/<ns>/<id>/.

    config.json   the OCI spec (the container's spec; root.path "rootfs" when mounts are given)
    task.json     the daemon's record: runtime, backend, options, stdio, rootfs; written last at
                  create, removed first at delete, so a directory without it is debris
    rootfs/       the mount point of the task's rootfs mounts
    shim.json     the shim process's record (address, pid), written by the shim
    shim.log      the shim process's log
    dead.json     the exit settled on after the shim died, until the task is deleted
    ...           whatever the backend keeps (runc: log.json, init.pid, exec-<id>.json/.pid)

Removal never recurses into rootfs/: a rootfs that is still mounted is unmounted first, and
removal refuses (rather than delete a snapshot's files) when it cannot be.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno as errno_codes
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from plugins.snapshotters import mount as mounts
from runtimed.errors import Internal
from runtimed.mountinfo import unescape as unescape_mountinfo
from runtimed.storage import write_atomic
from runtimed.types import Mount

TASK_RECORD = "task.json"
SHIM_RECORD = "shim.json"
DEAD_RECORD = "dead.json"
ROOTFS = "rootfs"


def write_json(path: Path, document: Any) -> None:
    """Atomically, without fsync: the state directory is volatile by design (tmpfs; a reboot
    ends every task), and a killed daemon loses nothing the rename does not already guard."""
    write_atomic(path, json.dumps(document).encode(), durable=False)


def read_json(path: Path) -> Any:
    with open(path) as handle:
        return json.load(handle)


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """Whether something is mounted on path, bind mounts from the same filesystem included
    (os.path.ismount misses those)."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as mountinfo:
        return any(unescape_mountinfo(line.split(" ", 5)[4]) == target for line in mountinfo)


# mount(2) and umount2(2) straight from libc for the common cases (an overlay or a bind mount, as
# the snapshotters return): a task's create and delete then spawn no mount(8)/umount(8), which
# costs ~3 ms each. Anything else, or an overlay whose options exceed one page, goes to
# plugins.snapshotters.mount (mount(8), with its lowerdir compaction).
_libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC = 0x20, 0x1000, 0x4000
MNT_DETACH = 0x2
EPERM, ENOENT, EBUSY, EINVAL = errno_codes.EPERM, errno_codes.ENOENT, errno_codes.EBUSY, errno_codes.EINVAL
_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}
_NO_FLAGS = {"rw", "suid", "dev", "exec"}


def _syscall_mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode() or None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {fstype} {source} on {target}: {os.strerror(errno)}")


def _mount_directly(mount: Mount, target: str) -> bool:
    """Mount with mount(2) if it is a plain overlay or bind mount; False to leave it to mount(8)."""
    flags, data = 0, []
    for option in mount.options:
        if option in _FLAGS:
            flags |= _FLAGS[option]
        elif option in _NO_FLAGS:
            continue
        elif option in ("bind", "rbind") and mount.type == "bind":
            flags |= MS_BIND | (MS_REC if option == "rbind" else 0)
        elif mount.type == "overlay" and "=" in option:
            data.append(option)
        else:
            return False
    if mount.type == "bind":
        _syscall_mount(mount.source, target, "none", flags | MS_BIND, "")
        if flags & MS_RDONLY:  # a bind mount is made read-only by a remount
            _syscall_mount("none", target, "none", flags | MS_BIND | MS_REMOUNT, "")
        return True
    if mount.type != "overlay" or len(",".join(data)) > mounts.MAX_MOUNT_DATA:
        return False
    _syscall_mount(mount.source or "overlay", target, "overlay", flags, ",".join(data))
    return True


async def mount_rootfs(rootfs: Sequence[Mount], target: str | os.PathLike[str]) -> None:
    """Create target (0711) and mount a task's rootfs mounts on it, in order; undo them all if
    one fails. The common case (one overlay or bind mount) is one hop to a thread."""
    path = os.fspath(target)

    def make_and_mount() -> bool:
        os.makedirs(path, mode=0o711, exist_ok=True)
        return len(rootfs) == 1 and _mount_directly(rootfs[0], path)

    try:
        if await asyncio.to_thread(make_and_mount):
            return
    except OSError as exc:
        raise mounts.MountError(str(exc)) from None
    await mounts.mount_all(rootfs, target)


def unmount_all_now(path: str) -> None:
    """Unmount everything stacked on path (detaching what is busy), in this thread; nothing
    mounted (or no path) is fine. umount2(2) itself tells: EINVAL is "not a mount point", so no
    /proc/self/mountinfo to read, and bind mounts from the same filesystem count too."""
    encoded = path.encode()
    for _ in range(32):
        if _libc.umount2(encoded, 0) == 0:
            continue
        errno = ctypes.get_errno()
        if errno in (EINVAL, ENOENT):
            return
        if errno == EPERM and not is_mounted(path):  # unprivileged: nothing to do is still fine
            return
        if errno == EBUSY and _libc.umount2(encoded, MNT_DETACH) == 0:
            continue
        raise OSError(errno, f"umount {path}: {os.strerror(errno)}")
    raise OSError(EBUSY, f"umount of {path}: still mounted after 32 unmounts")


async def unmount_all(target: str | os.PathLike[str]) -> None:
    """Unmount everything stacked on target (lazily when busy): one hop to a thread."""
    try:
        await asyncio.to_thread(unmount_all_now, os.fspath(target))
    except OSError as exc:
        raise Internal(str(exc)) from None


def make_directory(bundle: Path) -> None:
    """Create a task's directory; a concurrent remove() may rmdir the namespace directory under us."""
    for _ in range(3):
        bundle.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            bundle.mkdir(mode=0o700)
            return
        except FileNotFoundError:
            continue  # the last task of the namespace was removed in between: try again
    bundle.mkdir(mode=0o700)


async def remove(bundle: Path) -> None:
    """Remove a task's directory; its rootfs is unmounted first and only ever rmdir'ed. One hop
    to a thread."""

    def remove_now() -> None:
        try:
            unmount_all_now(str(bundle / ROOTFS))
        except OSError as exc:
            message = f"rootfs of {bundle} is still mounted ({exc}); not removing the task directory"
            raise Internal(message) from None
        with contextlib.suppress(FileNotFoundError):
            (bundle / TASK_RECORD).unlink()  # first: from here on the directory is debris
        for entry in list(os.scandir(bundle)) if bundle.exists() else []:
            path = Path(entry.path)
            # An exiting shim unlinks its own socket and record meanwhile: a vanished entry is fine.
            with contextlib.suppress(FileNotFoundError):
                if entry.name == ROOTFS and entry.is_dir(follow_symlinks=False):
                    path.rmdir()  # never rmtree: if it is not empty, something is wrong
                elif entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path)
                else:
                    path.unlink()
        with contextlib.suppress(FileNotFoundError):
            bundle.rmdir()
        with contextlib.suppress(OSError):
            bundle.parent.rmdir()  # the namespace directory, when it was the last task

    await asyncio.to_thread(remove_now)
