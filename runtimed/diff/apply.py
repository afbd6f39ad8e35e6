"""Applying an OCI layer (a tar of changes, maybe compressed) onto a snapshot, safely and fast.

Targets (decided from the snapshot's mounts, see runtimed.diff.mounts):
- one bind mount: extract into its source; whiteouts delete what the parent copy had;
- one overlay mount with an upperdir: extract into the upperdir with overlayfs whiteouts (a `.wh.x`
  becomes a 0/0 character device `x`, `.wh..wh..opq` sets trusted.overlay.opaque=y on its
  directory), exactly what containerd does; nothing is mounted;
- anything else is mounted on a private temporary directory and unmounted afterwards.

Safety: nothing is ever created, changed or removed outside the target directory.
- Entry names and hardlink targets that are absolute or contain a `..` component are refused.
- Every parent directory is opened relative to its own parent with O_NOFOLLOW|O_DIRECTORY, from a
  descriptor of the target root; a parent that is a symlink (planted by this layer or a lower one;
  in overlay mode also one in a lowerdir) or not a directory is refused. The final component is
  created with *at() calls on that descriptor, with O_EXCL/O_NOFOLLOW or the no-follow variants,
  so a symlink is never followed. (containerd instead resolves parent symlinks scoped to the root;
  layers written by image builders never need that, as they list real paths.)
- Hardlink targets are resolved the same way, must exist inside the target and must not be
  directories; a hardlink to a symlink links the symlink itself (like containerd). In overlay mode
  a target only present in a lowerdir is copied up first, as the kernel would.
- Names longer than PATH_MAX are refused; a tree too deep to remove is an error, not a crash.
- Character and block devices are refused by default (`devices="skip"` skips them with a warning,
  `devices="create"` creates them like containerd does as root); a 0/0 character device is inert
  (it is overlayfs' whiteout) and always allowed. FIFOs are allowed.
- xattrs in the trusted.* namespace (overlayfs' own: opaque, redirect, metacopy) and user.overlay.*
  are never taken from a layer; containerd also drops trusted.*.
An error (corrupt compression, truncated tar, unsafe entry) raises InvalidArgument naming the entry;
the caller discards the half-written snapshot.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import structlog

from runtimed.diff import tarstream
from runtimed.diff.mediatypes import LAYER_TAR, Compression, compression_of
from runtimed.diff.mounts import directory, is_bind, is_readonly, overlay_layers, temp_mount
from runtimed.diff.streams import Blob, UncompressedStream
from runtimed.diff.tarstream import TarEntry, TarReader
from runtimed.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, RuntimedError
from runtimed.types import Descriptor, Mount

log = structlog.get_logger("runtimed.diff")

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_CACHED_DIRS = 512
PATH_MAX = 4096
WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"


class DevicePolicy(StrEnum):
    REJECT = "reject"
    SKIP = "skip"
    CREATE = "create"


@dataclass(frozen=True)
class Applied:
    """What applying a layer produced: the diffID (sha256 of the uncompressed tar) and its size."""

    digest: str
    size: int
    media_type: str = LAYER_TAR

    def descriptor(self) -> Descriptor:
        return Descriptor(media_type=self.media_type, digest=self.digest, size=self.size)


def _unsafe(name: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"layer entry {name!r}: {why}")


def clean_name(name: str, entry: str | None = None) -> str:
    """The normalised relative path of an entry name ("" for the root); refuses escapes.

    `entry` names the entry when `name` is its hardlink target.
    """
    what = "" if entry is None else f"hardlink target {name!r}: "
    entry = name if entry is None else entry
    if len(name) > PATH_MAX // 4 and len(os.fsencode(name)) > PATH_MAX:
        raise _unsafe(entry[:200] + "...", f"{what}path longer than {PATH_MAX} bytes refused")
    if "\0" in name:
        raise _unsafe(entry, f"{what}name contains a NUL byte")
    if name.startswith("/"):
        raise _unsafe(entry, f"{what}absolute path refused")
    parts = [p for p in name.split("/") if p and p != "."]
    if ".." in parts:
        raise _unsafe(entry, f"{what}'..' path component refused")
    return "/".join(parts)


def open_regular(name: str, dir_fd: int) -> int | None:
    """Open `name` for reading only if it is a regular file (else None), never following a symlink.

    The node is first opened with O_PATH, which has no side effects: opening a FIFO could block
    and opening some devices acts on them.
    """
    node = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(node).st_mode):
            return None
        return os.open(f"/proc/self/fd/{node}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(node)


def _copy_data(src: int, dst: int, size: int) -> None:
    """Copy `size` bytes between two descriptors, in the kernel when it can."""
    remaining = size
    try:
        while remaining > 0:
            copied = os.copy_file_range(src, dst, min(remaining, 1 << 30))
            if copied == 0:
                return
            remaining -= copied
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        while remaining > 0 and (data := os.read(src, min(remaining, 1 << 20))):
            os.write(dst, data)
            remaining -= len(data)


def _os_error(name: str, exc: OSError) -> RuntimedError:
    what = f"layer entry {name!r}: {exc.strerror or exc}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(what)
    return FailedPrecondition(what)


class _Extractor:
    """Creates entries under one root directory, never following a symlink, never leaving the root."""

    def __init__(self, root: Path, lowers: Sequence[Path] | None, devices: DevicePolicy) -> None:
        self.overlay = lowers is not None
        self.lowers = tuple(lowers or ())
        self.devices = devices
        try:
            self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise FailedPrecondition(f"layer target {str(root)!r}: {exc.strerror}") from exc
        self.dirs: dict[str, int] = {"": self.root_fd}
        self.retired: list[int] = []
        self.lower_fds: list[int] | None = None
        # Paths this layer created (bind mode): an opaque marker keeps them.
        self.unpacked: set[str] = set()
        self.dir_times: list[tuple[str, int, int]] = []
        self.skipped: Counter[str] = Counter()
        self.name = ""

    # -- directory descriptors -------------------------------------------------------------------
    def close(self) -> None:
        for fd in list(self.dirs.values()) + self.retired + (self.lower_fds or []):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.dirs = {}
        self.retired = []
        self.lower_fds = None

    def _between_entries(self) -> None:
        # Descriptors are only closed between entries, so none in use by the current one is reused.
        for fd in self.retired:
            os.close(fd)
        self.retired = []
        if len(self.dirs) > MAX_CACHED_DIRS:
            for path, fd in self.dirs.items():
                if path:
                    os.close(fd)
            self.dirs = {"": self.root_fd}

    def _forget(self, path: str) -> None:
        """Drop cached descriptors of `path` and everything under it (it is being removed)."""
        prefix = path + "/"
        for key in [k for k in self.dirs if k == path or k.startswith(prefix)]:
            self.retired.append(self.dirs.pop(key))

    def _dir(self, path: str, create: bool) -> int | None:
        """A descriptor of directory `path` (relative to the root), opened without following symlinks.

        Missing directories are created when `create` (else None is returned). A component that is a
        symlink or not a directory is refused.
        """
        fd = self.dirs.get(path)
        if fd is not None:
            return fd
        # Start from the deepest cached ancestor (usually the parent), then walk down.
        start = path
        while start:
            start = start.rpartition("/")[0]
            fd = self.dirs.get(start)
            if fd is not None:
                break
        assert fd is not None  # the root is always cached
        current = start
        for base in path[len(start) :].lstrip("/").split("/"):
            current = f"{current}/{base}" if current else base
            try:
                child = os.open(base, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    return None
                self._make_parent(fd, current, base)
                child = os.open(base, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    st = os.stat(base, dir_fd=fd, follow_symlinks=False)
                    what = "a symlink (never followed)" if stat.S_ISLNK(st.st_mode) else "not a directory"
                    raise _unsafe(self.name, f"parent {current!r} is {what}") from None
                raise
            self.dirs[current] = fd = child
        return fd

    def _make_parent(self, pfd: int, path: str, base: str) -> None:
        """Create a directory the layer did not list (0755 root, or copied up from a lower layer)."""
        lower = self._lower_dir(path) if self.overlay else None
        try:
            os.mkdir(base, 0o700, dir_fd=pfd)
            fd = os.open(base, DIR_FLAGS, dir_fd=pfd)
        except BaseException:
            if lower is not None:
                os.close(lower)
            raise
        if not self.overlay:
            self.unpacked.add(path)
        try:
            if lower is None:
                os.fchmod(fd, 0o755)
                return
            try:
                st = os.fstat(lower)
                os.fchown(fd, st.st_uid, st.st_gid)
                for key in os.listxattr(lower):
                    if not key.startswith("trusted."):
                        os.setxattr(fd, key, os.getxattr(lower, key))
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
                os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(lower)
        finally:
            os.close(fd)

    # -- lower layers (overlay mode) -------------------------------------------------------------
    def _lower_roots(self) -> list[int]:
        if self.lower_fds is None:
            self.lower_fds = []
            for lower in self.lowers:
                try:
                    self.lower_fds.append(os.open(lower, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
                except OSError as exc:
                    raise FailedPrecondition(f"overlay lowerdir {str(lower)!r}: {exc.strerror}") from exc
        return self.lower_fds

    def _lower_node(self, path: str) -> int | None:
        """An O_PATH descriptor of `path` in the topmost lower layer that has it; None if none has it.

        No symlink is followed, and O_PATH has no side effects on what it opens (a FIFO, a device).
        A non-directory in the way (a whiteout, a file, a symlink) hides the layers below.
        """
        parts = path.split("/")
        for root in self._lower_roots():
            fd = root
            try:
                for part in parts[:-1]:
                    nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
                    if fd != root:
                        os.close(fd)
                    fd = nfd
                return os.open(parts[-1], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                continue  # not in this layer: look further down
            except OSError:
                return None  # a non-directory on the way hides it
            finally:
                if fd != root:
                    os.close(fd)
        return None

    def _lower_dir(self, path: str) -> int | None:
        """The lower layers' directory `path` (opened for reading), None if they do not have one.

        A symlink or another non-directory there is refused, as in the target itself: extracting
        under it through the merged view would follow it, and replacing it with a directory would
        change the image silently. A whiteout (0/0 character device) counts as absent.
        """
        node = self._lower_node(path)
        if node is None:
            return None
        try:
            st = os.fstat(node)
            if stat.S_ISDIR(st.st_mode):
                return os.open(f"/proc/self/fd/{node}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                return None
            what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise _unsafe(self.name, f"parent {path!r} is {what} in a lower layer (never followed)")
        finally:
            os.close(node)

    def _copy_up(self, path: str) -> bool:
        """Copy a regular file up from the lower layers into the upper (for a hardlink to it)."""
        parent, _, base = path.rpartition("/")
        node = self._lower_node(path)
        if node is None:
            return False
        try:
            if not stat.S_ISREG(os.fstat(node).st_mode):
                return False
            fd = os.open(f"/proc/self/fd/{node}", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(node)
        try:
            st = os.fstat(fd)
            pfd = self._dir(parent, create=True)
            out = os.open(base, FILE_FLAGS, 0o600, dir_fd=pfd)
            try:
                _copy_data(fd, out, st.st_size)
                os.fchown(out, st.st_uid, st.st_gid)
                for key in os.listxattr(fd):
                    if not key.startswith("trusted."):
                        os.setxattr(out, key, os.getxattr(fd, key))
                os.fchmod(out, stat.S_IMODE(st.st_mode))
                os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(out)
            return True
        finally:
            os.close(fd)

    # -- helpers ---------------------------------------------------------------------------------
    def _remove(self, dfd: int, dpath: str, name: str) -> None:
        """Remove `name` in directory `dfd` (recursively, never following symlinks); missing is fine."""
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            self._forget(f"{dpath}/{name}" if dpath else name)
            shutil.rmtree(name, dir_fd=dfd)
        else:
            os.unlink(name, dir_fd=dfd)

    def _set_xattrs(self, target: int | str, entry: TarEntry, regular_or_dir: bool) -> None:
        assert entry.xattrs is not None
        for key, value in entry.xattrs.items():
            if key.startswith("trusted.") or key.startswith("user.overlay."):
                self.skipped[f"xattr {key}"] += 1
                continue
            try:
                if isinstance(target, int):
                    os.setxattr(target, key, value)
                else:
                    os.setxattr(target, key, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) or (
                    exc.errno == errno.EPERM and key.startswith("user.") and not regular_or_dir
                ):
                    self.skipped[f"xattr {key} ({exc.strerror})"] += 1
                    continue
                raise

    def _finish_node(self, pfd: int, base: str, entry: TarEntry, chmod: bool) -> None:
        """Owner, mode, xattrs and times of a non-regular, non-directory entry, by name."""
        os.chown(base, entry.uid, entry.gid, dir_fd=pfd, follow_symlinks=False)
        if entry.xattrs:
            self._set_xattrs(f"/proc/self/fd/{pfd}/{base}", entry, regular_or_dir=False)
        if chmod:
            # FIFOs and devices: chmod through an O_PATH descriptor of the node itself (there is
            # no lchmod), so that nothing but the node we just created can be changed.
            node = os.open(base, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            try:
                os.chmod(f"/proc/self/fd/{node}", entry.mode & 0o7777)
            finally:
                os.close(node)
        os.utime(base, ns=(entry.atime_ns, entry.mtime_ns), dir_fd=pfd, follow_symlinks=False)

    # -- entries ---------------------------------------------------------------------------------
    def extract(self, entry: TarEntry, reader: TarReader) -> None:
        self.name = entry.name
        if self.retired or len(self.dirs) > MAX_CACHED_DIRS:
            self._between_entries()
        try:
            self._extract(entry, reader)
        except RuntimedError:
            raise
        except OSError as exc:
            raise _os_error(entry.name, exc) from exc

    def _extract(self, entry: TarEntry, reader: TarReader) -> None:
        path = clean_name(entry.name)
        if not path:
            return  # the root itself: ignored, like containerd
        parent, _, base = path.rpartition("/")
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(entry, parent, base)
            return
        if WHITEOUT_META_PREFIX in parent:
            self.skipped["aufs metadata"] += 1
            return
        kind = entry.kind
        if kind == tarstream.REG:
            self._regular(entry, reader, parent, base)
        elif kind == tarstream.DIR:
            self._directory(entry, path, parent, base)
        elif kind == tarstream.SYMLINK:
            pfd = self._create(parent, base, lambda pfd: os.symlink(entry.linkname, base, dir_fd=pfd))
            self._finish_node(pfd, base, entry, chmod=False)
        elif kind == tarstream.LINK:
            self._hardlink(entry, parent, base, path)
        elif kind == tarstream.FIFO:
            pfd = self._create(parent, base, lambda pfd: os.mkfifo(base, 0o600, dir_fd=pfd))
            self._finish_node(pfd, base, entry, chmod=True)
        elif kind in (tarstream.CHR, tarstream.BLK):
            self._device(entry, parent, base)
        else:
            self.skipped[f"entry type {kind!r}"] += 1
            return
        if not self.overlay:
            self.unpacked.add(path)

    def _create(self, parent: str, base: str, make) -> int:
        """Run make(parent_fd) to create `base`, replacing whatever is there; returns the parent fd."""
        pfd = self._dir(parent, create=True)
        assert pfd is not None
        try:
            make(pfd)
        except FileExistsError:
            self._remove(pfd, parent, base)
            make(pfd)
        return pfd

    def _regular(self, entry: TarEntry, reader: TarReader, parent: str, base: str) -> None:
        pfd = self._dir(parent, create=True)
        assert pfd is not None
        mode = entry.mode & 0o7777
        try:
            fd = os.open(base, FILE_FLAGS, mode & 0o777, dir_fd=pfd)
        except FileExistsError:
            self._remove(pfd, parent, base)
            fd = os.open(base, FILE_FLAGS, mode & 0o777, dir_fd=pfd)
        try:
            if entry.size:
                reader.copy_data(fd)
            # containerd's order: chown (which clears setuid and security.capability), xattrs
            # (an ACL xattr changes the mode bits), then the mode (the umask or a default ACL
            # trimmed it at creation).
            os.fchown(fd, entry.uid, entry.gid)
            if entry.xattrs:
                self._set_xattrs(fd, entry, regular_or_dir=True)
            os.fchmod(fd, mode)
            os.utime(fd, ns=(entry.atime_ns, entry.mtime_ns))
        finally:
            os.close(fd)

    def _directory(self, entry: TarEntry, path: str, parent: str, base: str) -> None:
        fd = self.dirs.get(path)
        if fd is None:
            pfd = self._dir(parent, create=True)
            assert pfd is not None
            replaced = False
            try:
                os.mkdir(base, 0o700, dir_fd=pfd)
            except FileExistsError:
                st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(base, dir_fd=pfd)
                    os.mkdir(base, 0o700, dir_fd=pfd)
                    replaced = True
            fd = os.open(base, DIR_FLAGS, dir_fd=pfd)
            self.dirs[path] = fd
            if replaced and self.overlay:
                # A directory replacing a non-directory must not show the lower layers' directory.
                os.setxattr(fd, OVERLAY_OPAQUE_XATTR, b"y")
        os.fchown(fd, entry.uid, entry.gid)
        if entry.xattrs:
            self._set_xattrs(fd, entry, regular_or_dir=True)
        os.fchmod(fd, entry.mode & 0o7777)
        # Directory times are set at the end: creating entries inside changes them.
        self.dir_times.append((path, entry.atime_ns, entry.mtime_ns))

    def _hardlink(self, entry: TarEntry, parent: str, base: str, path: str) -> None:
        target = clean_name(entry.linkname, entry.name)
        if not target:
            raise _unsafe(entry.name, "hardlink to the root directory refused")
        if target == path:
            return  # a link to itself: nothing to do
        tparent, _, tbase = target.rpartition("/")
        tfd = self._dir(tparent, create=False)
        st = None
        if tfd is not None:
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(tbase, dir_fd=tfd, follow_symlinks=False)
        if st is None and self.overlay and self._copy_up(target):
            tfd = self._dir(tparent, create=False)
            st = os.stat(tbase, dir_fd=tfd, follow_symlinks=False)
        if st is None or tfd is None:
            raise _unsafe(entry.name, f"hardlink target {entry.linkname!r} does not exist in the layer")
        if stat.S_ISDIR(st.st_mode):
            raise _unsafe(entry.name, f"hardlink target {entry.linkname!r} is a directory")

        def link(pfd: int) -> None:
            os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)

        pfd = self._create(parent, base, link)
        # Like containerd, the link entry's own owner, mode and times land on the shared inode.
        self._finish_node(pfd, base, entry, chmod=not stat.S_ISLNK(st.st_mode))

    def _device(self, entry: TarEntry, parent: str, base: str) -> None:
        whiteout = entry.kind == tarstream.CHR and entry.devmajor == 0 and entry.devminor == 0
        if not whiteout and self.devices is not DevicePolicy.CREATE:
            kind = "character" if entry.kind == tarstream.CHR else "block"
            if self.devices is DevicePolicy.SKIP:
                self.skipped[f"{kind} device"] += 1
                return
            raise _unsafe(
                entry.name,
                f"{kind} device {entry.devmajor}:{entry.devminor} refused (device nodes are not extracted)",
            )
        fmt = stat.S_IFCHR if entry.kind == tarstream.CHR else stat.S_IFBLK
        device = os.makedev(entry.devmajor, entry.devminor)
        pfd = self._create(parent, base, lambda pfd: os.mknod(base, fmt | 0o600, device, dir_fd=pfd))
        self._finish_node(pfd, base, entry, chmod=True)

    def _whiteout(self, entry: TarEntry, parent: str, base: str) -> None:
        if base == OPAQUE_MARKER:
            if self.overlay:
                fd = self._dir(parent, create=True)
                os.setxattr(fd, OVERLAY_OPAQUE_XATTR, b"y")
            else:
                fd = self._dir(parent, create=False)
                if fd is not None:
                    self._purge(fd, parent)
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            self.skipped["aufs metadata"] += 1
            return
        original = base[len(WHITEOUT_PREFIX) :]
        if original in ("", ".", ".."):
            raise _unsafe(entry.name, "invalid whiteout name")
        if self.overlay:
            pfd = self._dir(parent, create=True)
            assert pfd is not None
            self._remove(pfd, parent, original)
            os.mknod(original, stat.S_IFCHR, 0, dir_fd=pfd)
            os.chown(original, entry.uid, entry.gid, dir_fd=pfd, follow_symlinks=False)
        else:
            pfd = self._dir(parent, create=False)
            if pfd is not None:
                self._remove(pfd, parent, original)

    def _purge(self, dfd: int, dpath: str) -> None:
        """Bind-mode opaque directory: remove everything below not unpacked by this layer."""
        with os.scandir(dfd) as entries:
            children = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
        for name, is_dir in children:
            child = f"{dpath}/{name}" if dpath else name
            if child not in self.unpacked:
                self._remove(dfd, dpath, name)
            elif is_dir:
                cfd = os.open(name, DIR_FLAGS, dir_fd=dfd)
                try:
                    self._purge(cfd, child)
                finally:
                    os.close(cfd)

    def finish(self) -> None:
        """Set the times of the layer's directories, now that nothing is created in them any more."""
        self.name = ""
        for index, (path, atime, mtime) in enumerate(self.dir_times):
            if index % 256 == 0:
                self._between_entries()
            try:
                fd = self._dir(path, create=False)
            except InvalidArgument:
                continue  # replaced by a symlink later in the layer
            if fd is not None:
                os.utime(fd, ns=(atime, mtime))
        if self.skipped:
            log.warning("layer entries not extracted as-is", skipped=dict(self.skipped))


@contextlib.contextmanager
def _layer_target(mounts: Sequence[Mount]) -> Iterator[tuple[Path, tuple[Path, ...] | None]]:
    """(directory to extract into, overlay lowerdirs or None for real deletions)."""
    if not mounts:
        raise InvalidArgument("no mounts to apply the layer to")
    if len(mounts) == 1:
        mount = mounts[0]
        if mount.type == "overlay":
            layers = overlay_layers(mount)
            if layers.upper is not None:
                yield layers.upper, layers.lowers
                return
            raise FailedPrecondition("cannot apply a layer to a read-only overlay (no upperdir)")
        if is_bind(mount):
            if is_readonly(mount):
                raise FailedPrecondition(f"cannot apply a layer to read-only bind mount {mount.source!r}")
            yield directory(mount.source, "bind mount source"), None
            return
    with temp_mount(mounts) as target:
        yield target, None


def apply_layer(
    blob: Blob,
    media_type: str,
    mounts: Sequence[Mount],
    *,
    devices: DevicePolicy | str = DevicePolicy.REJECT,
    threaded: bool | None = None,
) -> Applied:
    """Apply a layer blob (a file path or a readable binary stream) onto the snapshot `mounts`.

    Synchronous and blocking: run it in a thread. Returns the diffID (sha256 of the uncompressed
    tar, trailing bytes included, as containerd computes it) and the uncompressed size.
    `threaded` runs decompression and hashing in a second thread; by default only for gzip
    (zstd already decompresses in its own process, and a plain tar gains nothing from it).
    """
    compression = compression_of(media_type)
    if threaded is None:
        threaded = compression is Compression.GZIP
    policy = DevicePolicy(devices)
    with _layer_target(mounts) as (root, lowers):
        extractor = _Extractor(root, lowers, policy)
        try:
            with UncompressedStream(blob, compression, threaded=threaded) as stream:
                reader = TarReader(stream.next_chunk)
                while (entry := reader.next()) is not None:
                    extractor.extract(entry, reader)
                extractor.finish()
                reader.drain()
                return Applied(digest=stream.digest, size=stream.size)
        except OSError as exc:
            raise _os_error(extractor.name or "(layer)", exc) from exc
        except RecursionError:
            raise InvalidArgument(f"layer entry {extractor.name!r}: directory tree too deep") from None
        finally:
            extractor.close()
