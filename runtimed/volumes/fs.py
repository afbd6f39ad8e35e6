"""Filesystem work of volumes, done with directory file descriptors so that nothing escapes.

- remove_tree: delete a directory tree without following a symlink or entering a mount.
- resolve_in_root: resolve a path inside a root directory the way a chroot would (symlinks and ".."
  never leave the root).
- copy_tree: copy a directory's contents with modes, owners, times, symlinks, hard links, device
  nodes and extended attributes (where the filesystems allow).

Every function here blocks: callers run them in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import structlog

from runtimed.errors import FailedPrecondition, InvalidArgument, q
from runtimed.mountinfo import unescape as unescape_mountinfo

log = structlog.get_logger("runtimed.volumes")

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_SYMLINK_HOPS = 40  # Linux's MAXSYMLINKS
COPY_CHUNK = 1 << 20
# The overlay filesystem's own bookkeeping; never copied out of a snapshot.
SKIPPED_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")


def filesystem_type(mountpoint: Path) -> str | None:
    """The filesystem type of the topmost mount at `mountpoint` (None if nothing is mounted there)."""
    target = os.path.normpath(mountpoint)
    found = None
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields, _, rest = line.partition(" - ")
            fields_list = fields.split()
            if len(fields_list) >= 5 and unescape_mountinfo(fields_list[4]) == target and rest:
                found = rest.split()[0]  # later lines are mounted on top of earlier ones
    return found


def mounts_at_or_below(path: Path) -> list[str]:
    """Mount points (of this process's mount namespace) at `path` or inside it."""
    prefix = os.path.normpath(path)
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if len(fields) < 5:
                continue
            point = unescape_mountinfo(fields[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def remove_tree(path: Path) -> int:
    """Remove the directory `path` and everything in it; returns the bytes its files held.

    Symlinks are removed, never followed; a mount anywhere inside (found in mountinfo, or a
    directory on another device) stops the removal with FailedPrecondition before it enters it.
    Files with several links inside the tree are counted once. A missing `path` removes nothing.
    """
    mounted = mounts_at_or_below(path)
    if mounted:
        raise FailedPrecondition(f"{path} has mounts inside it ({', '.join(mounted)}); not removing it")
    try:
        parent_fd = os.open(path.parent, DIR_FLAGS)
    except FileNotFoundError:
        return 0
    try:
        try:
            info = os.lstat(path.name, dir_fd=parent_fd)
        except FileNotFoundError:
            return 0
        if not stat.S_ISDIR(info.st_mode):
            os.unlink(path.name, dir_fd=parent_fd)
            return info.st_size if stat.S_ISREG(info.st_mode) else 0
        size = _remove_contents(parent_fd, path.name, info, path)
        os.rmdir(path.name, dir_fd=parent_fd)
        return size
    finally:
        os.close(parent_fd)


def _open_dir_at(parent_fd: int, name: str, expected: os.stat_result) -> int:
    fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (expected.st_dev, expected.st_ino):
        os.close(fd)
        raise FailedPrecondition(f"{name!r} changed while it was being removed")
    return fd


def _remove_contents(parent_fd: int, name: str, info: os.stat_result, top: Path) -> int:
    """Empty the directory `name` (in parent_fd), depth first without recursion."""
    device = info.st_dev
    seen: set[int] = set()
    size = 0
    root_fd = _open_dir_at(parent_fd, name, info)
    # (fd of a directory, names left in it, its name in the directory below it on the stack)
    stack: list[tuple[int, list[str], str]] = [(root_fd, os.listdir(root_fd), name)]
    try:
        while stack:
            fd, names, dirname = stack[-1]
            if not names:
                stack.pop()
                os.close(fd)
                if stack:
                    os.rmdir(dirname, dir_fd=stack[-1][0])
                continue
            entry = names.pop()
            try:
                entry_info = os.lstat(entry, dir_fd=fd)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(entry_info.st_mode):
                if entry_info.st_dev != device:
                    raise FailedPrecondition(f"a mount inside {top} ({entry!r}); not removing it")
                child = _open_dir_at(fd, entry, entry_info)
                stack.append((child, os.listdir(child), entry))
                continue
            if stat.S_ISREG(entry_info.st_mode) and entry_info.st_ino not in seen:
                size += entry_info.st_size
                if entry_info.st_nlink > 1:
                    seen.add(entry_info.st_ino)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry, dir_fd=fd)
    finally:
        for fd, _, _ in stack:
            os.close(fd)
    return size


def is_empty_dir(fd: int) -> bool:
    return not os.listdir(fd)


@dataclass
class Resolved:
    """A path resolved inside a root: the directory holding it (an fd the caller closes) and its name."""

    parent_fd: int
    name: str  # "." when the path is the root itself
    info: os.stat_result


def resolve_in_root(root_fd: int, path: str) -> Resolved | None:
    """Resolve `path` inside the directory root_fd as if root_fd were "/"; None when it does not exist.

    Absolute symlinks restart from the root, ".." stops at the root; every step is an openat with
    O_NOFOLLOW, so a symlink swapped in meanwhile cannot lead outside either.
    """
    parts = [p for p in path.split("/") if p and p != "."]
    stack = [os.dup(root_fd)]  # directories resolved so far; stack[0] is the root
    hops = 0
    try:
        while parts:
            part = parts.pop(0)
            if part == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            try:
                info = os.lstat(part, dir_fd=stack[-1])
            except (FileNotFoundError, NotADirectoryError):
                return None
            except OSError as exc:
                if exc.errno == errno.ENAMETOOLONG:  # no such name can exist
                    return None
                raise
            if stat.S_ISLNK(info.st_mode):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise InvalidArgument(f"path {q(path)}: too many levels of symbolic links")
                target = os.readlink(part, dir_fd=stack[-1])
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                parts = [p for p in target.split("/") if p and p != "."] + parts
                continue
            if not parts:  # the last component: hand back its parent and name
                return Resolved(stack.pop(), part, info)
            if not stat.S_ISDIR(info.st_mode):
                return None  # a file in the middle of the path: nothing there
            stack.append(_open_dir_at(stack[-1], part, info))
        top = stack.pop()
        return Resolved(top, ".", os.fstat(top))
    finally:
        for fd in stack:
            os.close(fd)


def _copy_xattrs(src: int, dst: int) -> None:
    """Copy extended attributes between two open files, skipping what the target refuses."""
    try:
        names = os.listxattr(src)
    except OSError:
        return
    for name in names:
        if name.startswith(SKIPPED_XATTR_PREFIXES):
            continue
        try:
            os.setxattr(dst, name, os.getxattr(src, name))
        except OSError as exc:
            log.debug("xattr not copied", name=name, error=str(exc))


def apply_attributes(src_fd: int, dst_fd: int, info: os.stat_result) -> None:
    """Owner, mode (after the owner: chown clears set-id bits), xattrs and times, from src to dst."""
    os.fchown(dst_fd, info.st_uid, info.st_gid)
    os.fchmod(dst_fd, stat.S_IMODE(info.st_mode))
    _copy_xattrs(src_fd, dst_fd)
    os.utime(dst_fd, ns=(info.st_atime_ns, info.st_mtime_ns))


def _copy_data(src: int, dst: int) -> None:
    try:
        while os.copy_file_range(src, dst, COPY_CHUNK):
            pass
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    os.lseek(src, 0, os.SEEK_SET)
    os.lseek(dst, 0, os.SEEK_SET)
    os.ftruncate(dst, 0)
    while chunk := os.read(src, COPY_CHUNK):
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view) :]


def _copy_entry(
    src_dir: int, dst_dir: int, name: str, info: os.stat_result, links: dict, rel: str, dst_root: int
) -> None:
    """Copy one non-directory entry."""
    mode = info.st_mode
    if info.st_nlink > 1 and not stat.S_ISDIR(mode):
        first = links.get((info.st_dev, info.st_ino))
        if first is not None:
            os.link(first, name, src_dir_fd=dst_root, dst_dir_fd=dst_dir, follow_symlinks=False)
            return
        links[(info.st_dev, info.st_ino)] = rel
    times = (info.st_atime_ns, info.st_mtime_ns)
    if stat.S_ISREG(mode):
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
        try:
            dst = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dst_dir,
            )
            try:
                _copy_data(src, dst)
                apply_attributes(src, dst, info)
            finally:
                os.close(dst)
        finally:
            os.close(src)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(name, dir_fd=src_dir), name, dir_fd=dst_dir)
        os.chown(name, info.st_uid, info.st_gid, dir_fd=dst_dir, follow_symlinks=False)
        os.utime(name, ns=times, dir_fd=dst_dir, follow_symlinks=False)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
        os.mknod(name, mode, info.st_rdev, dir_fd=dst_dir)
        os.chown(name, info.st_uid, info.st_gid, dir_fd=dst_dir, follow_symlinks=False)
        os.chmod(name, stat.S_IMODE(mode), dir_fd=dst_dir)
        os.utime(name, ns=times, dir_fd=dst_dir, follow_symlinks=False)
    else:  # sockets: nothing to copy
        log.debug("not copying a socket", path=rel)


def copy_tree(src_fd: int, dst_fd: int) -> None:
    """Copy the contents of directory src_fd into the (empty, private) directory dst_fd.

    The attributes of the top directory itself are not applied (the caller decides where they go).
    Directories are walked without recursion; their attributes are set once they are complete.
    Directories on another filesystem (mounts inside the source) are left out.
    """
    links: dict[tuple[int, int], str] = {}
    device = os.fstat(src_fd).st_dev
    # (source fd, target fd, names left, the source's stat, path relative to the top)
    stack: list[tuple[int, int, list[str], os.stat_result | None, str]] = [
        (os.dup(src_fd), os.dup(dst_fd), sorted(os.listdir(src_fd)), None, "")
    ]
    try:
        while stack:
            src, dst, names, info, rel = stack[-1]
            if not names:
                stack.pop()
                try:
                    if info is not None:
                        apply_attributes(src, dst, info)
                finally:
                    os.close(src)
                    os.close(dst)
                continue
            name = names.pop(0)
            entry = os.lstat(name, dir_fd=src)
            entry_rel = f"{rel}/{name}" if rel else name
            if stat.S_ISDIR(entry.st_mode):
                if entry.st_dev != device:  # a mount inside the source: not part of the image
                    log.debug("not copying a directory on another filesystem", path=entry_rel)
                    continue
                child_src = _open_dir_at(src, name, entry)
                try:
                    os.mkdir(name, 0o700, dir_fd=dst)
                    child_dst = os.open(name, DIR_FLAGS, dir_fd=dst)
                except BaseException:
                    os.close(child_src)
                    raise
                stack.append((child_src, child_dst, sorted(os.listdir(child_src)), entry, entry_rel))
            else:
                _copy_entry(src, dst, name, entry, links, entry_rel, dst_fd)
    finally:
        for src, dst, _, _, _ in stack:
            os.close(src)
            os.close(dst)
