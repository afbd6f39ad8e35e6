"""Volumes: named directories that outlive containers, namespaced, recorded in the metadata database.

Layout under the plugin's root (`<root>/io.runtimed.volume.v1.local`):

    <namespace>/<name>/_data      the mountpoint a container bind-mounts
    <namespace>/<name>/.seed-*    a copy-up in progress (invisible to containers), renamed over
                                  the empty _data when complete
    .tmp/<random>/_data           a volume being created
    .trash/<random>               a volume being removed

The metadata row is the truth. Create builds the directory under .tmp and renames it into place
inside the transaction that inserts the row; Remove deletes the row, then moves the directory to
.trash and deletes it. A crash at any point leaves at most a directory without a row, which the
start-up recovery removes (and .tmp and .trash are emptied then too), so no half-made volume is
ever visible. Seed mounts live under the plugin's state directory; the start-up recovery
unmounts any a crash left.

A volume's users are the containers of its namespace whose OCI spec has a mount whose source is
the volume's directory or inside it, whoever created them (runtimectl, ctr, any client): Remove
refuses while there are any, in the same transaction that deletes the row.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import secrets
import sqlite3
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from google.protobuf.message import DecodeError

from runtimed import filters, labels
from runtimed.aio import KeyedLocks
from runtimed.api.runtimed.services.volumes.v1 import volumes_pb2 as events_pb2
from runtimed.diff import mounts as mountlib
from runtimed.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, q
from runtimed.events.exchange import Exchange
from runtimed.metadata import namespaces
from runtimed.metadata.containers import decode_any
from runtimed.metadata.db import Database
from runtimed.storage import fsync_dir
from runtimed.types import Mount, now_ns
from runtimed.volumes import fs

log = structlog.get_logger("runtimed.volumes")

# docker's rule for local volume names; bounded by what one directory name can hold.
NAME_PATTERN = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")
MAX_NAME_LENGTH = 255
DATA = "_data"
TMP = ".tmp"
TRASH = ".trash"
SEED_PREFIX = ".seed-"
# What an image's root filesystem can be mounted as (snapshotters' mounts); "none" only as a bind.
ROOTFS_TYPES = frozenset({"overlay", "bind", "none", "ext4", "ext3", "ext2", "xfs", "btrfs", "zfs", "erofs",
                          "squashfs"})  # fmt: skip
# Options that would act on other mounts than the one being made.
FORBIDDEN_OPTIONS = frozenset({"remount", "move", "rmove"})
# Filesystems that are not an image, whatever bind mount leads to them: never copied from.
PSEUDO_FILESYSTEMS = frozenset({
    "proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "devtmpfs", "devpts",
    "mqueue", "bpf", "configfs", "fusectl", "pstore", "efivarfs", "hugetlbfs", "autofs", "binfmt_misc",
    "nsfs", "rpc_pipefs", "selinuxfs", "nfsd",
})  # fmt: skip
MAX_ROOTFS_MOUNTS = 32
MAX_MOUNT_SOURCE = 4096
MAX_MOUNT_DATA = 4095
MAX_ERROR_DETAIL = 1024


@dataclass
class Volume:
    name: str
    mountpoint: str
    labels: dict[str, str] = field(default_factory=dict)
    created_at: int = 0  # ns since the epoch
    used_by: list[str] = field(default_factory=list)


def validate_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"volume name {q(name[:64])}...: longer than {MAX_NAME_LENGTH} characters")
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(
            f"volume name {q(name)}: must match {NAME_PATTERN.pattern} "
            "(at least two characters, the first a letter or digit)"
        )
    return name


def generate_name() -> str:
    return secrets.token_hex(32)


def _adaptor(volume: Volume) -> filters.Adaptor:
    return filters.adaptor_for({"name": volume.name}, volume.labels)


def _json_safe(text: str) -> bool:
    """Whether `text` appears verbatim in any JSON encoding of it (no escapes needed)."""
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


def validate_rootfs(rootfs: Sequence[Mount], what: str) -> None:
    """Refuse mounts that are not an image's root filesystem before anything is mounted."""
    if not rootfs:
        raise InvalidArgument(f"{what}: rootfs must have at least one mount")
    if len(rootfs) > MAX_ROOTFS_MOUNTS:
        raise InvalidArgument(f"{what}: rootfs has {len(rootfs)} mounts, more than {MAX_ROOTFS_MOUNTS}")
    for mount in rootfs:
        if mount.type not in ROOTFS_TYPES:
            raise InvalidArgument(
                f"{what}: rootfs mount type {q(mount.type[:64])} is not an image filesystem "
                f"({', '.join(sorted(ROOTFS_TYPES))})"
            )
        if mount.type == "none" and not {"bind", "rbind"} & set(mount.options):
            raise InvalidArgument(f'{what}: rootfs mount of type "none" must be a bind mount')
        if not mount.source or len(mount.source) > MAX_MOUNT_SOURCE or "\x00" in mount.source:
            raise InvalidArgument(f"{what}: rootfs mount source {q(mount.source[:64])} is not a valid source")
        for option in mount.options:
            if option in FORBIDDEN_OPTIONS or "," in option or "\x00" in option:
                raise InvalidArgument(f"{what}: rootfs mount option {q(option[:64])} is not allowed")
        if len(",".join(mount.options)) > MAX_MOUNT_DATA:
            raise InvalidArgument(f"{what}: rootfs mount options longer than {MAX_MOUNT_DATA} bytes")


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_ERROR_DETAIL else text[:MAX_ERROR_DETAIL] + "..."


def readonly_view(rootfs: Sequence[Mount]) -> list[Mount]:
    """The mounts to read rootfs through: its directories as a read-only overlay (or bind) when it
    is a bind or overlay mount, so that an upperdir in use by a running container is never mounted
    a second time with its workdir; anything else as given (mounted read-only by the caller)."""
    layers = mountlib.directory_layers(rootfs)
    if not layers:
        return list(rootfs)
    if len(layers) == 1:
        return [Mount("bind", str(layers[0]), options=["bind", "ro"])]
    lowerdir = "lowerdir=" + ":".join(str(layer) for layer in layers)
    if len(lowerdir) > 4000:  # what one page of mount data holds, with room for the rest
        return list(rootfs)
    return [Mount("overlay", "overlay", options=["ro", lowerdir])]


class VolumeStore:
    def __init__(self, root: Path, state: Path, db: Database, events: Exchange) -> None:
        self.root = Path(os.path.abspath(root))
        self.state = Path(os.path.abspath(state))
        self._db = db
        self._events = events
        self._locks = KeyedLocks()
        # Specs that do not name the plugin's directory cannot mount a volume: skip decoding them.
        # (Its name, not the whole root: a source may spell the root's path with "//" or "/./".)
        self._needle = self.root.name.encode() if _json_safe(self.root.name) else b""

    # -- paths and locks ----------------------------------------------------------------------

    def directory(self, namespace: str, name: str) -> Path:
        return self.root / namespace / name

    def mountpoint(self, namespace: str, name: str) -> str:
        return str(self.directory(namespace, name) / DATA)

    @contextlib.asynccontextmanager
    async def _locked(self, namespace: str, name: str) -> AsyncIterator[None]:
        """Serialise create, remove and seed of one volume (the daemon is the only writer)."""
        async with self._locks.hold((namespace, name)):
            yield

    # -- start-up -------------------------------------------------------------------------------

    async def open(self) -> None:
        def read(conn: sqlite3.Connection) -> set[tuple[str, str]]:
            return {(r["namespace"], r["name"]) for r in conn.execute("SELECT namespace, name FROM volumes")}

        recorded = await self._db.read(read)
        await asyncio.to_thread(self._recover, recorded)

    def _recover(self, recorded: set[tuple[str, str]]) -> None:
        """Make the directories match the records: what a crash left half-done goes."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for leftover in sorted(self.state.glob("seed-*")) if self.state.is_dir() else []:
            mountlib.unmount_all(leftover, len(fs.mounts_at_or_below(leftover)))
            if fs.mounts_at_or_below(leftover):
                log.warning("a seed mount left by a crash is still mounted", path=str(leftover))
                continue
            with contextlib.suppress(OSError):
                leftover.rmdir()
        for special in (TMP, TRASH):
            (self.root / special).mkdir(mode=0o700, exist_ok=True)
            for entry in list((self.root / special).iterdir()):
                self._remove_quietly(entry)
        for ns_dir in sorted(self.root.iterdir()):
            if ns_dir.name.startswith(".") or not ns_dir.is_dir() or ns_dir.is_symlink():
                continue
            for volume_dir in sorted(ns_dir.iterdir()):
                if (ns_dir.name, volume_dir.name) not in recorded:
                    log.info("removing a volume directory without a record", path=str(volume_dir))
                    self._discard(volume_dir)
                    continue
                if volume_dir.is_symlink() or not volume_dir.is_dir():
                    log.warning("volume directory is not a directory", path=str(volume_dir))
                    continue
                for entry in volume_dir.iterdir():
                    if entry.name.startswith(SEED_PREFIX):
                        self._remove_quietly(entry)
        for namespace, name in sorted(recorded):
            data = self.directory(namespace, name) / DATA
            if not os.path.lexists(data):
                log.warning(
                    "volume directory missing; made it again, empty", namespace=namespace, volume=name
                )
                data.parent.parent.mkdir(mode=0o700, exist_ok=True)
                data.parent.mkdir(mode=0o700, exist_ok=True)
                data.mkdir(mode=0o755)

    def _remove_quietly(self, path: Path) -> int:
        try:
            return fs.remove_tree(path)
        except (OSError, FailedPrecondition) as exc:
            log.warning("could not remove volume debris; will retry at the next start", path=str(path),
                        error=str(exc))  # fmt: skip
            return 0

    def _discard(self, path: Path) -> int:
        """Move a volume directory out of sight (into .trash), then delete it; returns its bytes."""
        trash = self.root / TRASH / secrets.token_hex(16)
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning("could not move a volume directory to the trash", path=str(path), error=str(exc))
            return 0
        return self._remove_quietly(trash)

    # -- reading --------------------------------------------------------------------------------

    def _mount_sources(self, conn: sqlite3.Connection, namespace: str) -> list[tuple[str, list[str]]]:
        """(container id, the normalised sources of its spec's mounts under the volumes root)."""
        prefix = str(self.root) + "/"
        found = []
        rows = conn.execute("SELECT id, spec FROM containers WHERE namespace = ? ORDER BY id", (namespace,))
        for row in rows:
            blob = row["spec"]
            if not blob or self._needle not in blob:
                continue
            try:
                spec = decode_any(blob)
                document = json.loads(spec.value) if spec is not None else None
            except (ValueError, DecodeError):
                continue  # not a JSON runtime spec: it mounts nothing we know of
            mounts = document.get("mounts") if isinstance(document, dict) else None
            sources = [
                os.path.normpath(m["source"])
                for m in (mounts if isinstance(mounts, list) else [])
                if isinstance(m, dict) and isinstance(m.get("source"), str)
            ]
            sources = [s for s in sources if s.startswith(prefix)]
            if sources:
                found.append((row["id"], sources))
        return found

    def _users(self, sources: list[tuple[str, list[str]]], namespace: str, name: str) -> list[str]:
        directory = str(self.directory(namespace, name))
        inside = directory + "/"
        return [
            container_id
            for container_id, paths in sources
            if any(p == directory or p.startswith(inside) for p in paths)
        ]

    def _volume(self, row: sqlite3.Row, namespace: str, sources: list[tuple[str, list[str]]]) -> Volume:
        name = row["name"]
        return Volume(
            name=name,
            mountpoint=self.mountpoint(namespace, name),
            labels=json.loads(row["labels"]),
            created_at=row["created_at"],
            used_by=self._users(sources, namespace, name),
        )

    def _get(self, conn: sqlite3.Connection, namespace: str, name: str) -> Volume:
        row = conn.execute(
            "SELECT * FROM volumes WHERE namespace = ? AND name = ?", (namespace, name)
        ).fetchone()
        if row is None:
            raise NotFound(f"volume {q(name)}")
        return self._volume(row, namespace, self._mount_sources(conn, namespace))

    async def get(self, namespace: str, name: str) -> Volume:
        validate_name(name)
        return await self._db.read(self._get, namespace, name)

    async def list(self, namespace: str, filter_exprs: Sequence[str] = ()) -> list[Volume]:
        matcher = filters.parse_all(filter_exprs)

        def read(conn: sqlite3.Connection) -> list[Volume]:
            rows = conn.execute(
                "SELECT * FROM volumes WHERE namespace = ? ORDER BY name", (namespace,)
            ).fetchall()
            sources = self._mount_sources(conn, namespace) if rows else []
            volumes = [self._volume(row, namespace, sources) for row in rows]
            return [v for v in volumes if matcher.match(_adaptor(v))]

        return await self._db.read(read)

    # -- create and remove ----------------------------------------------------------------------

    async def create(
        self, namespace: str, name: str = "", volume_labels: dict[str, str] | None = None
    ) -> Volume:
        name = validate_name(name) if name else generate_name()
        volume_labels = labels.validate(volume_labels or {}, f"volume {q(name)}")
        async with self._locked(namespace, name):
            staging = await asyncio.to_thread(self._make_staging)
            target = self.directory(namespace, name)
            displaced: list[Path] = []
            stamp = now_ns()

            def write(conn: sqlite3.Connection) -> list[str]:
                namespaces.ensure(conn, namespace)
                try:
                    conn.execute(
                        "INSERT INTO volumes(namespace, name, labels, created_at) VALUES (?, ?, ?, ?)",
                        (namespace, name, json.dumps(volume_labels), stamp),
                    )
                except sqlite3.IntegrityError:
                    raise AlreadyExists(f"volume {q(name)}") from None
                target.parent.mkdir(mode=0o700, exist_ok=True)
                if os.path.lexists(target):  # debris without a record (a remove that could not finish)
                    displaced.append(self.root / TRASH / secrets.token_hex(16))
                    os.rename(target, displaced[-1])
                os.rename(staging, target)
                fsync_dir(target.parent)
                # Containers may name the path already (made before the volume, e.g. by ctr).
                return self._users(self._mount_sources(conn, namespace), namespace, name)

            try:
                used_by = await self._db.write(write)
            except BaseException:
                if os.path.lexists(staging):
                    await asyncio.to_thread(self._remove_quietly, staging)
                raise
            finally:
                for path in displaced:
                    await asyncio.to_thread(self._remove_quietly, path)
        log.info("volume created", namespace=namespace, volume=name)
        self._events.publish(
            namespace, "/volumes/create", events_pb2.VolumeCreate(name=name, labels=volume_labels)
        )
        return Volume(
            name=name,
            mountpoint=self.mountpoint(namespace, name),
            labels=volume_labels,
            created_at=stamp,
            used_by=used_by,
        )

    def _make_staging(self) -> Path:
        staging = Path(tempfile.mkdtemp(prefix="", dir=self.root / TMP))
        (staging / DATA).mkdir(mode=0o755)
        os.chmod(staging / DATA, 0o755)  # whatever the umask
        return staging

    async def remove(self, namespace: str, name: str) -> int:
        """Remove a volume and its data; returns the bytes its files held."""
        validate_name(name)
        async with self._locked(namespace, name):
            return await self._remove_locked(namespace, name)

    async def _remove_locked(self, namespace: str, name: str) -> int:
        directory = self.directory(namespace, name)
        mounted = await asyncio.to_thread(fs.mounts_at_or_below, directory)
        if mounted:
            raise FailedPrecondition(
                f"volume {q(name)} has mounts inside it ({', '.join(mounted)}): unmount them first"
            )

        def write(conn: sqlite3.Connection) -> None:
            row = conn.execute(
                "SELECT 1 FROM volumes WHERE namespace = ? AND name = ?", (namespace, name)
            ).fetchone()
            if row is None:
                raise NotFound(f"volume {q(name)}")
            users = self._users(self._mount_sources(conn, namespace), namespace, name)
            if users:
                noun = "container" if len(users) == 1 else "containers"
                raise FailedPrecondition(f"volume {q(name)} is in use by {noun} {', '.join(map(q, users))}")
            conn.execute("DELETE FROM volumes WHERE namespace = ? AND name = ?", (namespace, name))

        await self._db.write(write)
        # From here the volume is gone; a crash now leaves a directory the next start removes.
        size = await asyncio.to_thread(self._discard, directory)
        log.info("volume removed", namespace=namespace, volume=name, bytes=size)
        self._events.publish(namespace, "/volumes/delete", events_pb2.VolumeDelete(name=name))
        return size

    async def prune(self, namespace: str, filter_exprs: Sequence[str] = ()) -> tuple[list[str], int]:
        """Remove every volume matching the filters that no container uses: (names, bytes)."""
        removed, reclaimed = [], 0
        for volume in await self.list(namespace, filter_exprs):
            if volume.used_by:
                continue
            try:
                reclaimed += await self.remove(namespace, volume.name)
            except (NotFound, FailedPrecondition) as exc:  # removed or taken into use meanwhile
                log.info("not pruning volume", namespace=namespace, volume=volume.name, reason=str(exc))
                continue
            removed.append(volume.name)
        return removed, reclaimed

    # -- seed (copy-up) ---------------------------------------------------------------------------

    async def seed(self, namespace: str, name: str, rootfs: Sequence[Mount], path: str) -> bool:
        """Copy `path` of the mounted rootfs into the volume if it is empty; whether it copied."""
        validate_name(name)
        validate_rootfs(rootfs, f"seed volume {q(name)}")
        if not path.startswith("/") or "\x00" in path:
            raise InvalidArgument(f"seed volume {q(name)}: path {q(path)} must be an absolute path")
        async with self._locked(namespace, name):
            volume = await self.get(namespace, name)  # NotFound before any mounting
            copied = await asyncio.to_thread(
                self._seed, self.directory(namespace, name), list(rootfs), path, bool(volume.used_by)
            )
        log.info(
            "volume seeded" if copied else "volume not seeded", namespace=namespace, volume=name, path=path
        )
        return copied

    def _seed(self, directory: Path, rootfs: list[Mount], path: str, in_use: bool) -> bool:
        volume_fd = os.open(directory, fs.DIR_FLAGS)
        try:
            data_fd = os.open(DATA, fs.DIR_FLAGS, dir_fd=volume_fd)
            try:
                if not fs.is_empty_dir(data_fd):
                    return False
                with self._mounted(rootfs) as target:
                    root_fd = os.open(target, fs.DIR_FLAGS)
                    try:
                        return self._copy_up(directory, volume_fd, data_fd, root_fd, path, in_use)
                    finally:
                        os.close(root_fd)
            finally:
                os.close(data_fd)
        finally:
            os.close(volume_fd)

    def _copy_up(
        self, directory: Path, volume_fd: int, data_fd: int, root_fd: int, path: str, in_use: bool
    ) -> bool:
        """Copy into a staging directory beside _data, then make it _data in one rename (or, when a
        container may have _data mounted, move its entries in: the mounted directory must stay)."""
        resolved = fs.resolve_in_root(root_fd, path)
        if resolved is None:
            return False
        try:
            if not stat.S_ISDIR(resolved.info.st_mode):
                raise FailedPrecondition(f"path {q(path)} in the image is not a directory")
            source_fd = os.open(resolved.name, fs.DIR_FLAGS, dir_fd=resolved.parent_fd)
        finally:
            os.close(resolved.parent_fd)
        try:
            staging = SEED_PREFIX + secrets.token_hex(8)
            os.mkdir(staging, 0o700, dir_fd=volume_fd)
            try:
                staging_fd = os.open(staging, fs.DIR_FLAGS, dir_fd=volume_fd)
                try:
                    fs.copy_tree(source_fd, staging_fd)
                    if not fs.is_empty_dir(data_fd):  # someone wrote into it meanwhile: theirs wins
                        return False
                    if in_use:
                        for entry in sorted(os.listdir(staging_fd)):
                            os.rename(entry, entry, src_dir_fd=staging_fd, dst_dir_fd=data_fd)
                        fs.apply_attributes(source_fd, data_fd, os.fstat(source_fd))
                        return True
                    fs.apply_attributes(source_fd, staging_fd, os.fstat(source_fd))
                finally:
                    os.close(staging_fd)
                try:  # atomic: a crash leaves either the empty _data or the whole copy
                    os.rename(staging, DATA, src_dir_fd=volume_fd, dst_dir_fd=volume_fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        return False
                    raise
                os.fsync(volume_fd)
                return True
            finally:
                fs.remove_tree(directory / staging)
        finally:
            os.close(source_fd)

    @contextlib.contextmanager
    def _mounted(self, rootfs: list[Mount]) -> Iterator[Path]:
        """rootfs mounted read-only on a private directory under the plugin's state; always undone."""
        self.state.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = Path(tempfile.mkdtemp(prefix="seed-", dir=self.state))
        count = 0
        try:
            try:
                count = mountlib.mount_all(readonly_view(rootfs), target, readonly=True)
            except FailedPrecondition as exc:
                raise FailedPrecondition(f"mounting the rootfs: {_bounded(exc.reason)}") from None
            fstype = fs.filesystem_type(target)
            if fstype in PSEUDO_FILESYSTEMS:
                raise InvalidArgument(f"rootfs is a {q(fstype)} filesystem, not an image")
            yield target
        finally:
            mountlib.unmount_all(target, count)
            if fs.mounts_at_or_below(target):
                log.error("seed mount still present after unmounting", target=str(target))
            else:
                with contextlib.suppress(OSError):
                    target.rmdir()
