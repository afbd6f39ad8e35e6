"""Writing into an image's root filesystem mounted on the host, without ever leaving it.

The image's own symlinks are followed *inside* the root (docker's FollowSymlinkInScope): an image
whose /app is a symlink to /etc gets COPY ... /app/x written to <root>/etc/x, never to the host's
/etc. Every directory is then opened component by component with O_NOFOLLOW relative to its
parent, and every entry is created relative to its directory's descriptor without following the
final component, so a symlink can only be written as a symlink.

Also here: numeric ids for USER and --chown from the image's /etc/passwd and /etc/group, and ADD's
extraction of a local tar archive (gzip, bzip2, xz or plain) with the archive's owners and modes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from runtimed.build.context import Entry
from runtimed.errors import FailedPrecondition
from runtimed.paths import follow_in_root

DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class BuildStepError(FailedPrecondition):
    """A step that cannot be carried out as written (a missing source, a bad user): exit 1."""


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int


class RootFS:
    def __init__(self, root: Path) -> None:
        self.root = root

    # -- paths ------------------------------------------------------------------------------------

    def resolve(self, path: str, *, follow_last: bool = True) -> str:
        """The absolute in-image path `path` leads to, its symlinks followed within the root."""
        try:
            return "/" + "/".join(follow_in_root(self.root, path, follow_last=follow_last))
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise BuildStepError(f"{path}: too many levels of symbolic links") from None

    def open_dir(self, path: str, *, create: bool = False, owner: Owner = Owner(0, 0)) -> int:
        """An O_PATH-like descriptor of the directory at in-image `path` (already resolved)."""
        fd = os.open(self.root, DIR_OPEN)
        try:
            for part in [p for p in path.split("/") if p]:
                try:
                    child = os.open(part, DIR_OPEN, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    os.chown(part, owner.uid, owner.gid, dir_fd=fd, follow_symlinks=False)
                    child = os.open(part, DIR_OPEN, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                        raise BuildStepError(f"{path}: {part} is not a directory") from None
                    raise
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def directory(self, path: str, *, create: bool = False, owner: Owner = Owner(0, 0)) -> Iterator[int]:
        fd = self.open_dir(self.resolve(path), create=create, owner=owner)
        try:
            yield fd
        finally:
            os.close(fd)

    def lstat(self, path: str) -> os.stat_result | None:
        """lstat of the in-image path (its parents resolved in scope); None if it does not exist."""
        resolved = self.resolve(path, follow_last=False)
        parent, name = posixpath.split(resolved)
        if not name:
            return os.lstat(self.root)
        try:
            with self.directory(parent) as fd:
                return os.lstat(name, dir_fd=fd)
        except (FileNotFoundError, BuildStepError):
            return None

    def is_dir(self, path: str) -> bool:
        try:
            with self.directory(path):
                return True
        except (FileNotFoundError, BuildStepError):
            return False

    def read_file(self, path: str) -> bytes | None:
        resolved = self.resolve(path)
        parent, name = posixpath.split(resolved)
        try:
            with self.directory(parent) as dfd:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except (OSError, BuildStepError):
            return None
        with os.fdopen(fd, "rb") as handle:
            return handle.read(1 << 22)

    def mkdirs(self, path: str, owner: Owner = Owner(0, 0)) -> bool:
        """mkdir -p inside the root; True if something was created."""
        existed = self.is_dir(path)
        if not existed:
            with self.directory(path, create=True, owner=owner):
                pass
        return not existed

    # -- users ------------------------------------------------------------------------------------

    def _table(self, path: str) -> list[list[str]]:
        data = self.read_file(path)
        if data is None:
            return []
        return [
            line.split(":") for line in data.decode(errors="replace").splitlines() if line and line[0] != "#"
        ]

    def user(self, spec: str) -> tuple[int, int, list[int]]:
        """USER for a process: (uid, gid, additional gids), as runc's user lookup gives them."""
        name, _, group = spec.partition(":")
        passwd = self._table("/etc/passwd")
        uid = gid = None
        username = ""
        for row in passwd:
            if len(row) >= 4 and (row[0] == name or (name.isdigit() and row[2] == name)):
                username = row[0]
                uid, gid = int(row[2]), int(row[3])
                break
        if uid is None:
            if not name.isdigit():
                raise BuildStepError(f"unable to find user {name}: no matching entries in passwd file")
            uid, gid = int(name), 0
        groups = self._table("/etc/group")
        if group:
            gid = self._group(group, groups)
        extra = []
        if username and not group:
            for row in groups:
                if len(row) >= 4 and username in row[3].split(",") and row[2].isdigit():
                    extra.append(int(row[2]))
        return uid, gid, sorted(set(extra) - {gid})

    def _group(self, group: str, groups: list[list[str]]) -> int:
        for row in groups:
            if len(row) >= 3 and (row[0] == group or (group.isdigit() and row[2] == group)):
                return int(row[2])
        if group.isdigit():
            return int(group)
        raise BuildStepError(f"unable to find group {group}: no matching entries in group file")

    def chown_owner(self, spec: str) -> Owner:
        """--chown=user[:group]: a user alone gives its uid as the gid too, as docker does."""
        name, _, group = spec.partition(":")
        if name.isdigit():
            uid = int(name)
        else:
            for row in self._table("/etc/passwd"):
                if len(row) >= 3 and row[0] == name:
                    uid = int(row[2])
                    break
            else:
                raise BuildStepError(
                    f"unable to convert uid/gid chown string to host mapping: no such user {name}"
                )
        if not group:
            return Owner(uid, uid)
        return Owner(uid, self._group(group, self._table("/etc/group")))

    # -- copying ----------------------------------------------------------------------------------

    def copy(self, entries: list[Entry], dest: str, *, owner: Owner | None, chmod: int | None) -> None:
        """Copy context entries below `dest` (entry "" is `dest` itself)."""
        dirs: list[tuple[str, os.stat_result]] = []
        for entry in entries:
            target = dest if not entry.rel else posixpath.join(dest, entry.rel)
            st = entry.st
            own = owner or Owner(0, 0)
            mode = chmod if chmod is not None else stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                if entry.rel:
                    self._place(target, st, entry.path, own, mode)
                else:
                    created = self.mkdirs(target)
                    if created or owner is not None:
                        self._meta(target, own, mode if created else None)
                dirs.append((target, st))
            elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                self._place(target, st, entry.path, own, mode)
        for target, st in reversed(dirs):  # directory times last: writing inside changes them
            self._times(target, st.st_atime_ns, st.st_mtime_ns)

    def _meta(self, path: str, owner: Owner, mode: int | None) -> None:
        parent, name = posixpath.split(self.resolve(path))
        if not name:
            return
        with self.directory(parent) as fd:
            os.chown(name, owner.uid, owner.gid, dir_fd=fd, follow_symlinks=False)
            if mode is not None:
                os.chmod(name, mode, dir_fd=fd)

    def _times(self, path: str, atime: int, mtime: int) -> None:
        parent, name = posixpath.split(self.resolve(path, follow_last=False))
        if name:
            with self.directory(parent) as fd, contextlib.suppress(OSError):
                os.utime(name, ns=(atime, mtime), dir_fd=fd, follow_symlinks=False)

    def _clear(self, fd: int, parent: str, name: str, keep_dir: bool) -> None:
        """Make room for a new entry: a directory stays when keep_dir, anything else goes."""
        try:
            existing = os.lstat(name, dir_fd=fd)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(existing.st_mode):
            if keep_dir:
                return
            raise BuildStepError(
                f"cannot replace directory {posixpath.join(parent, name)} with a non-directory"
            )
        os.unlink(name, dir_fd=fd)

    def _place(self, path: str, st: os.stat_result, source: Path, owner: Owner, mode: int) -> None:
        parent, name = posixpath.split(path)
        if not name:
            raise BuildStepError(f"cannot copy onto {path}")
        parent = self.resolve(parent)
        with self.directory(parent, create=True) as fd:
            if stat.S_ISDIR(st.st_mode):
                self._clear(fd, parent, name, keep_dir=True)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=fd)
                os.chown(name, owner.uid, owner.gid, dir_fd=fd, follow_symlinks=False)
                os.chmod(name, mode, dir_fd=fd)
                return
            self._clear(fd, parent, name, keep_dir=False)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(source), name, dir_fd=fd)
            else:
                out = os.open(
                    name,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=fd,
                )
                try:
                    with open(source, "rb") as src:
                        _copy_fd(src.fileno(), out, st.st_size)
                finally:
                    os.close(out)
            os.chown(name, owner.uid, owner.gid, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(name, mode, dir_fd=fd)
            os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=fd, follow_symlinks=False)

    # -- ADD of a local archive -------------------------------------------------------------------

    def extract(self, archive: BinaryIO, dest: str) -> list[str]:
        """Extract a tar stream below `dest`; returns the names of entries skipped (devices)."""
        skipped: list[str] = []
        dirs: list[tuple[str, tarfile.TarInfo]] = []
        self.mkdirs(dest)
        with tarfile.open(fileobj=archive, mode="r|*") as tar:
            for member in tar:
                rel = posixpath.normpath("/" + member.name).lstrip("/")
                if posixpath.normpath(member.name.lstrip("/")).startswith(".."):
                    raise BuildStepError(f"archive entry {member.name!r} points outside the destination")
                if not rel or rel == ".":
                    continue
                target = posixpath.join(dest, rel)
                parent, name = posixpath.split(target)
                parent = self.resolve(parent)
                with self.directory(parent, create=True) as fd:
                    if member.isdir():
                        self._clear(fd, parent, name, keep_dir=True)
                        with contextlib.suppress(FileExistsError):
                            os.mkdir(name, 0o700, dir_fd=fd)
                        dirs.append((posixpath.join(parent, name), member))
                    elif member.isreg():
                        self._clear(fd, parent, name, keep_dir=False)
                        out = os.open(
                            name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=fd
                        )
                        try:
                            stream = tar.extractfile(member)
                            assert stream is not None
                            while chunk := stream.read(1 << 20):
                                os.write(out, chunk)
                        finally:
                            os.close(out)
                    elif member.issym():
                        self._clear(fd, parent, name, keep_dir=False)
                        os.symlink(member.linkname, name, dir_fd=fd)
                    elif member.islnk():
                        self._clear(fd, parent, name, keep_dir=False)
                        self._hardlink(dest, member, fd, name)
                    elif member.isfifo():
                        self._clear(fd, parent, name, keep_dir=False)
                        os.mkfifo(name, 0o600, dir_fd=fd)
                    else:
                        skipped.append(member.name)
                        continue
                    if not member.isdir() and not member.islnk():
                        os.chown(name, member.uid, member.gid, dir_fd=fd, follow_symlinks=False)
                        if not member.issym():
                            os.chmod(name, member.mode & 0o7777, dir_fd=fd)
                        with contextlib.suppress(OSError):
                            os.utime(name, (member.mtime, member.mtime), dir_fd=fd, follow_symlinks=False)
        for path, member in reversed(dirs):
            parent, name = posixpath.split(path)
            with self.directory(parent) as fd:
                os.chown(name, member.uid, member.gid, dir_fd=fd, follow_symlinks=False)
                os.chmod(name, member.mode & 0o7777, dir_fd=fd)
                with contextlib.suppress(OSError):
                    os.utime(name, (member.mtime, member.mtime), dir_fd=fd, follow_symlinks=False)
        return skipped

    def _hardlink(self, dest: str, member: tarfile.TarInfo, fd: int, name: str) -> None:
        link = posixpath.normpath(member.linkname.lstrip("/"))
        if link.startswith(".."):
            raise BuildStepError(f"archive hardlink {member.name!r} points outside the destination")
        source = self.resolve(posixpath.join(dest, link), follow_last=False)
        source_parent, source_name = posixpath.split(source)
        with self.directory(source_parent) as sfd:
            os.link(source_name, name, src_dir_fd=sfd, dst_dir_fd=fd, follow_symlinks=False)

    def remove_empty_dir(self, path: str) -> None:
        parent, name = posixpath.split(path)
        with contextlib.suppress(OSError, BuildStepError), self.directory(parent) as fd:
            os.rmdir(name, dir_fd=fd)

    def remove_tree(self, path: str) -> None:
        shutil.rmtree(self.root / self.resolve(path).lstrip("/"), ignore_errors=True)


def _copy_fd(src: int, dst: int, size: int) -> None:
    offset = 0
    while True:
        try:
            sent = os.sendfile(dst, src, offset, 1 << 24)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS) or offset:
                raise
            while chunk := os.read(src, 1 << 20):
                os.write(dst, chunk)
            return
        if sent == 0:
            return
        offset += sent


def archive_kind(path: Path) -> str | None:
    """The compression of a tar archive at path ("" for a plain tar), or None if it is not one."""
    with open(path, "rb") as handle:
        head = handle.read(6)
        handle.seek(0)
        if head.startswith(b"\x1f\x8b"):
            kind = "gz"
        elif head.startswith(b"BZh"):
            kind = "bz2"
        elif head.startswith(b"\xfd7zXZ\x00"):
            kind = "xz"
        else:
            kind = ""
        try:
            with tarfile.open(fileobj=handle, mode=f"r|{kind or ''}") as tar:
                if tar.next() is None and kind == "":
                    return None
        except Exception:  # tarfile, zlib, lzma and bz2 each have their own errors
            return None
    return kind
