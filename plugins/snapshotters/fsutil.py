"""Blocking filesystem helpers for snapshotters; callers run them in threads."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from plugins.snapshotters.types import Usage
from runtimed.mountinfo import unescape as unescape_mountinfo
from runtimed.storage import fsync_dir  # noqa: F401 - the snapshotters call fsutil.fsync_dir

MOUNTINFO = Path("/proc/self/mountinfo")


def disk_usage(root: Path) -> Usage:
    """Like containerd's fs.DiskUsage: allocated bytes and inodes under root, hardlinks counted once."""
    seen: set[tuple[int, int]] = set()
    size = 0

    def account(st: os.stat_result) -> None:
        nonlocal size
        key = (st.st_dev, st.st_ino)
        if key not in seen:
            seen.add(key)
            size += st.st_blocks * 512

    account(os.lstat(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            try:
                account(os.lstat(os.path.join(dirpath, name)))
            except FileNotFoundError:
                continue  # removed while we walk (an active snapshot is still being written)
    return Usage(size=size, inodes=len(seen))


def mount_points() -> list[str]:
    """Every mount point of this mount namespace."""
    try:
        text = MOUNTINFO.read_text()
    except OSError:
        return []
    return [unescape_mountinfo(line.split()[4]) for line in text.splitlines() if line]


def mounts_inside(path: Path, points: list[str]) -> list[str]:
    """The mount points among `points` at or below `path`."""
    prefix = str(path).rstrip("/") + "/"
    return [m for m in points if m == str(path) or m.startswith(prefix)]


def mount_points_under(path: Path) -> list[str]:
    return mounts_inside(path, mount_points())


def remove_tree(path: Path) -> None:
    """Remove a directory tree, refusing when something is mounted inside it.

    shutil.rmtree would descend into a mount and delete another filesystem's files (a rootfs
    still mounted from a leftover directory, say); better to leave the directory for a later
    cleanup and say why.
    """
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        os.unlink(path)
        return
    mounted = mount_points_under(path)
    if mounted:
        raise OSError(f"{path} still has mounts inside it: {', '.join(sorted(mounted))}")
    shutil.rmtree(path)
