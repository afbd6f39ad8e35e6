"""Writing the difference between two snapshots as an OCI layer (the "walking" differ).

- Overlay fast path: when the upper mounts are one overlay whose lowerdirs are exactly the layers of
  the lower mounts, the upperdir *is* the change set: it is walked alone. A 0/0 character device is
  a deletion (`.wh.<name>`); a directory with trusted.overlay.opaque=y gets a `.wh..wh..opq` entry.
- Otherwise both trees are compared (mounted read-only in a temp dir when they are not plain
  directories), like containerd's double walk: an entry is changed when its type, mode, owner,
  device, size, mtime, symlink target or xattrs differ (and, when both mtimes are whole seconds,
  its content); a path only in the lower tree becomes a `.wh.` whiteout.

Output is deterministic: entries in path order (each directory's names sorted bytewise, a
directory before its contents), ustar headers with PAX records only where needed, no user/group
names, no atime/ctime, mtimes truncated to whole seconds (as containerd does), whiteouts with
mtime 0, gzip with no name and mtime 0. The parent directories of every change are included so
that applying the layer restores their metadata. Hardlinks inside the change set stay hardlinks.
Only user.* and security.* xattrs are carried (not security.selinux, a host label, and not
trusted.* or user.overlay.*, overlayfs' own).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import queue
import stat
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from runtimed.diff import tarstream
from runtimed.diff.apply import DIR_FLAGS, OVERLAY_OPAQUE_XATTR, open_regular
from runtimed.diff.mediatypes import MEDIA_TYPE_OF, Compression
from runtimed.diff.mounts import directory, directory_layers, is_bind, overlay_layers, temp_mount
from runtimed.errors import FailedPrecondition, InvalidArgument
from runtimed.types import Descriptor, Mount

CHUNK = 1 << 20
QUEUE_DEPTH = 8
GZIP_LEVEL = 6
NS = 1_000_000_000


@dataclass(frozen=True)
class WrittenDiff:
    """The layer written: its blob (compressed digest and size) and its diffID."""

    media_type: str
    digest: str
    size: int
    diff_id: str
    uncompressed_size: int

    def descriptor(self) -> Descriptor:
        return Descriptor(media_type=self.media_type, digest=self.digest, size=self.size)


class _Sink:
    """Tar bytes in; compressed bytes out to `out`, both hashed and counted.

    With gzip, hashing and compression run in a worker thread (zlib and hashlib release the GIL),
    overlapping the tree walk and file reads of the caller.
    """

    def __init__(self, out: BinaryIO, compression: Compression) -> None:
        self.out = out
        self.buf = bytearray()
        self.tar_hash = hashlib.sha256()
        self.blob_hash = hashlib.sha256()
        self.tar_size = 0
        self.blob_size = 0
        # wbits=31: a gzip member with mtime 0 and no file name, so output depends on input only.
        self.deflate = None
        self._queue: queue.Queue | None = None
        self._worker: threading.Thread | None = None
        self._error: BaseException | None = None
        if compression is Compression.GZIP:
            self.deflate = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
            self._queue = queue.Queue(QUEUE_DEPTH)
            self._worker = threading.Thread(target=self._work, daemon=True, name="layer-compress")
            self._worker.start()

    def write(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        data = bytes(self.buf)
        self.buf.clear()
        if self._queue is None:
            self._process(data)
            return
        if self._error is not None:
            raise self._error
        self._queue.put(data)

    def _process(self, data: bytes) -> None:
        self.tar_hash.update(data)
        self.tar_size += len(data)
        self._emit(self.deflate.compress(data) if self.deflate is not None else data)

    def _emit(self, data: bytes) -> None:
        if data:
            self.blob_hash.update(data)
            self.blob_size += len(data)
            self.out.write(data)

    def _work(self) -> None:
        assert self._queue is not None
        while (data := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so that the writer never blocks
            try:
                self._process(data)
            except BaseException as exc:
                self._error = exc

    def _join(self) -> None:
        if self._worker is not None and self._queue is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None

    def close(self) -> None:
        self.write(tarstream.END_OF_ARCHIVE)
        self.flush()
        self._join()
        if self._error is not None:
            raise self._error
        if self.deflate is not None:
            self._emit(self.deflate.flush())
        with contextlib.suppress(AttributeError, OSError):
            self.out.flush()

    def abort(self) -> None:
        self.buf.clear()
        self._join()


def _carried(key: str) -> bool:
    if key.startswith("user."):
        return not key.startswith("user.overlay.")
    return key.startswith("security.") and key != "security.selinux"


class _Node:
    """One directory entry: its stat, and (lazily) its xattrs and link target."""

    __slots__ = ("_all_xattrs", "_link", "dfd", "name", "st")

    def __init__(self, dfd: int, name: str, st: os.stat_result) -> None:
        self.dfd = dfd
        self.name = name
        self.st = st
        self._all_xattrs: dict[str, bytes] | None = None
        self._link: str | None = None

    @property
    def proc_path(self) -> str:
        # The directory by descriptor, the last component not followed: no symlink is ever followed.
        return f"/proc/self/fd/{self.dfd}/{self.name}"

    def all_xattrs(self) -> dict[str, bytes]:
        if self._all_xattrs is None:
            result: dict[str, bytes] = {}
            try:
                keys = os.listxattr(self.proc_path, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                keys = []
            for key in keys:
                try:
                    result[key] = os.getxattr(self.proc_path, key, follow_symlinks=False)
                except OSError as exc:
                    if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                        raise
            self._all_xattrs = result
        return self._all_xattrs

    def xattrs(self) -> list[tuple[str, bytes]]:
        return sorted((k, v) for k, v in self.all_xattrs().items() if _carried(k))

    def link(self) -> str:
        if self._link is None:
            self._link = os.readlink(self.name, dir_fd=self.dfd)
        return self._link


def _children(dfd: int) -> dict[str, _Node]:
    nodes = {}
    with os.scandir(dfd) as entries:
        for entry in entries:
            nodes[entry.name] = _Node(dfd, entry.name, entry.stat(follow_symlinks=False))
    return nodes


def _sorted_names(names) -> list[str]:
    return sorted(names, key=os.fsencode)


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _open_regular(node: _Node) -> int:
    fd = open_regular(node.name, node.dfd)
    if fd is None:
        raise FailedPrecondition(f"diff: {node.name!r} changed type while being read")
    return fd


def _same_content(lower: _Node, upper: _Node) -> bool:
    fds = []
    try:
        for node in (lower, upper):
            fds.append(_open_regular(node))
        while True:
            a = os.read(fds[0], CHUNK)
            b = os.read(fds[1], CHUNK)
            if a != b:
                return False
            if not a:
                return True
    finally:
        for fd in fds:
            os.close(fd)


def _same(lower: _Node, upper: _Node) -> bool:
    a, b = lower.st, upper.st
    if a.st_mode != b.st_mode or a.st_uid != b.st_uid or a.st_gid != b.st_gid:
        return False
    if (stat.S_ISCHR(a.st_mode) or stat.S_ISBLK(a.st_mode)) and a.st_rdev != b.st_rdev:
        return False
    if a.st_mtime_ns != b.st_mtime_ns:
        return False
    if not stat.S_ISDIR(a.st_mode):
        if a.st_size != b.st_size:
            return False
        if stat.S_ISLNK(a.st_mode) and lower.link() != upper.link():
            return False
    if lower.xattrs() != upper.xattrs():
        return False
    if stat.S_ISREG(a.st_mode) and a.st_size and a.st_mtime_ns % NS == 0:
        # Times truncated to seconds (e.g. both extracted from tars): only the content can tell.
        return _same_content(lower, upper)
    return True


class _Differ:
    def __init__(self, sink: _Sink) -> None:
        self.sink = sink
        self.emitted_dirs: set[str] = set()
        # Upper directories seen so far, to emit them as parents of a change.
        self.dir_nodes: dict[str, _Node] = {}
        self.inode_src: dict[tuple[int, int], str] = {}
        self.inode_refs: dict[tuple[int, int], list[str]] = {}

    # -- output ----------------------------------------------------------------------------------
    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            parent = "/".join(parts[:depth])
            if parent not in self.emitted_dirs:
                self._dir_header(parent, self.dir_nodes[parent])

    def _dir_header(self, path: str, node: _Node) -> None:
        st = node.st
        self.emitted_dirs.add(path)
        self.sink.write(
            tarstream.header(
                path + "/",
                tarstream.DIR,
                mode=stat.S_IMODE(st.st_mode),
                uid=st.st_uid,
                gid=st.st_gid,
                mtime=st.st_mtime_ns // NS,
                xattrs=node.xattrs(),
            )
        )

    def whiteout(self, path: str) -> None:
        self._parents(path)
        parent, _, base = path.rpartition("/")
        self.sink.write(tarstream.header(_join(parent, ".wh." + base), tarstream.REG))

    def directory(self, path: str, node: _Node, opaque: bool = False) -> None:
        self._parents(path)
        self._dir_header(path, node)
        if opaque:
            self.sink.write(tarstream.header(_join(path, ".wh..wh..opq"), tarstream.REG))

    def _link_entry(self, path: str, target: str, st: os.stat_result) -> None:
        self._parents(path)
        self.sink.write(
            tarstream.header(
                path,
                tarstream.LINK,
                mode=stat.S_IMODE(st.st_mode),
                uid=st.st_uid,
                gid=st.st_gid,
                mtime=st.st_mtime_ns // NS,
                linkname=target,
            )
        )

    def node(self, path: str, node: _Node, changed: bool) -> None:
        """A non-directory of the upper tree: written when changed, or as a link to a changed inode."""
        st = node.st
        extra: list[str] = []
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            source = self.inode_src.get(key)
            if source is not None:
                self._link_entry(path, source, st)
                return
            if not changed:
                self.inode_refs.setdefault(key, []).append(path)
                return
            self.inode_src[key] = path
            extra = self.inode_refs.pop(key, [])
        elif not changed:
            return
        mode = st.st_mode
        kind: str
        size = 0
        linkname = ""
        devmajor = devminor = 0
        if stat.S_ISREG(mode):
            kind, size = tarstream.REG, st.st_size
        elif stat.S_ISLNK(mode):
            kind, linkname = tarstream.SYMLINK, node.link()
        elif stat.S_ISFIFO(mode):
            kind = tarstream.FIFO
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            kind = tarstream.CHR if stat.S_ISCHR(mode) else tarstream.BLK
            devmajor, devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        else:
            return  # sockets (and anything else) are not carried, as in containerd
        self._parents(path)
        self.sink.write(
            tarstream.header(
                path,
                kind,
                mode=stat.S_IMODE(mode),
                uid=st.st_uid,
                gid=st.st_gid,
                size=size,
                mtime=st.st_mtime_ns // NS,
                linkname=linkname,
                devmajor=devmajor,
                devminor=devminor,
                xattrs=node.xattrs(),
            )
        )
        if size:
            self._copy(path, node, size)
        for other in extra:
            self._link_entry(other, path, st)

    def _copy(self, path: str, node: _Node, size: int) -> None:
        fd = _open_regular(node)
        try:
            remaining = size
            while remaining:
                data = os.read(fd, min(remaining, CHUNK))
                if not data:
                    raise FailedPrecondition(f"diff: {path!r} shrank while being read")
                self.sink.write(data)
                remaining -= len(data)
        finally:
            os.close(fd)
        self.sink.write(tarstream.data_padding(size))

    # -- walks -----------------------------------------------------------------------------------
    def _remember_dir(self, path: str, node: _Node) -> None:
        node.all_xattrs()  # read now: its directory descriptor is closed after the walk moves on
        self.dir_nodes[path] = node

    def _open_dir(self, node: _Node) -> int:
        return os.open(node.name, DIR_FLAGS, dir_fd=node.dfd)

    def walk_upperdir(self, path: str, dfd: int) -> None:
        """Overlay fast path: every entry of the upperdir is a change."""
        children = _children(dfd)
        for name in _sorted_names(children):
            node = children[name]
            child = _join(path, name)
            mode = node.st.st_mode
            if stat.S_ISCHR(mode) and node.st.st_rdev == 0:
                self.whiteout(child)
                continue
            xattrs = node.all_xattrs()
            for unsupported in ("trusted.overlay.redirect", "trusted.overlay.metacopy"):
                if unsupported in xattrs:
                    raise FailedPrecondition(f"diff: {child!r} has {unsupported} (not supported)")
            if stat.S_ISDIR(mode):
                self._remember_dir(child, node)
                self.directory(child, node, opaque=xattrs.get(OVERLAY_OPAQUE_XATTR) == b"y")
                cfd = self._open_dir(node)
                try:
                    self.walk_upperdir(child, cfd)
                finally:
                    os.close(cfd)
            else:
                self.node(child, node, changed=True)

    def compare(self, path: str, lfd: int | None, ufd: int) -> None:
        """Double walk: `lfd` is the lower directory at `path` (None when it has none)."""
        lower = _children(lfd) if lfd is not None else {}
        upper = _children(ufd)
        for name in _sorted_names(lower.keys() | upper.keys()):
            child = _join(path, name)
            old = lower.get(name)
            new = upper.get(name)
            if new is None:
                self.whiteout(child)
                continue
            new_is_dir = stat.S_ISDIR(new.st.st_mode)
            if old is not None and new_is_dir == stat.S_ISDIR(old.st.st_mode):
                changed = not _same(old, new)
            else:
                changed = True
            if not new_is_dir:
                self.node(child, new, changed)
                continue
            self._remember_dir(child, new)
            if changed:
                self.directory(child, new)
            both_dirs = old is not None and stat.S_ISDIR(old.st.st_mode)
            clfd = self._open_dir(old) if both_dirs and old is not None else None
            try:
                cufd = self._open_dir(new)
                try:
                    self.compare(child, clfd, cufd)
                finally:
                    os.close(cufd)
            finally:
                if clfd is not None:
                    os.close(clfd)


def _same_layers(a: Sequence[Path], b: Sequence[Path]) -> bool:
    return [os.path.normpath(p) for p in a] == [os.path.normpath(p) for p in b]


def _open_root(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise FailedPrecondition(f"diff: {str(path)!r}: {exc.strerror}") from exc


def _tree(stack: contextlib.ExitStack, mounts: Sequence[Mount]) -> Path:
    """A directory showing `mounts`: a bind source as is, anything else mounted read-only."""
    if len(mounts) == 1 and is_bind(mounts[0]):
        return directory(mounts[0].source, "bind mount source")
    return stack.enter_context(temp_mount(mounts, readonly=True))


def write_diff(
    lower_mounts: Sequence[Mount],
    upper_mounts: Sequence[Mount],
    out: BinaryIO,
    compression: Compression | str = Compression.GZIP,
) -> WrittenDiff:
    """Write to `out` the layer that turns the lower snapshot into the upper one.

    `lower_mounts` may be empty (the upper snapshot has no parent: everything is added).
    Synchronous and blocking: run it in a thread.
    """
    try:
        kind = Compression(compression)
    except ValueError:
        raise InvalidArgument(f"unsupported diff compression {compression!r}") from None
    if kind is Compression.ZSTD:
        raise InvalidArgument("zstd compression of a diff is not supported: use gzip or none")
    if not upper_mounts:
        raise InvalidArgument("diff: no upper mounts")
    fast_root: Path | None = None
    if len(upper_mounts) == 1 and upper_mounts[0].type == "overlay":
        layers = overlay_layers(upper_mounts[0])
        lower_layers = directory_layers(lower_mounts)
        known_lower = lower_layers is not None and _same_layers(layers.lowers, lower_layers)
        if layers.upper is not None and known_lower:
            fast_root = layers.upper
    sink = _Sink(out, kind)
    differ = _Differ(sink)
    with contextlib.ExitStack() as stack:
        try:
            if fast_root is not None:
                root = _open_root(fast_root)
                stack.callback(os.close, root)
                with contextlib.suppress(OSError):
                    if os.getxattr(root, OVERLAY_OPAQUE_XATTR) == b"y":
                        sink.write(tarstream.header(".wh..wh..opq", tarstream.REG))
                differ.walk_upperdir("", root)
            else:
                upper_root = _open_root(_tree(stack, upper_mounts))
                stack.callback(os.close, upper_root)
                lower_root = None
                if lower_mounts:
                    lower_root = _open_root(_tree(stack, lower_mounts))
                    stack.callback(os.close, lower_root)
                differ.compare("", lower_root, upper_root)
        except BaseException as exc:
            sink.abort()
            if isinstance(exc, OSError):
                raise FailedPrecondition(f"diff: {exc.filename or ''}: {exc.strerror or exc}") from exc
            if isinstance(exc, RecursionError):
                raise FailedPrecondition("diff: directory tree too deep") from None
            raise
    try:
        sink.close()
    except OSError as exc:
        raise FailedPrecondition(f"diff: writing the layer: {exc.strerror or exc}") from exc
    return WrittenDiff(
        media_type=MEDIA_TYPE_OF[kind],
        digest="sha256:" + sink.blob_hash.hexdigest(),
        size=sink.blob_size,
        diff_id="sha256:" + sink.tar_hash.hexdigest(),
        uncompressed_size=sink.tar_size,
    )
