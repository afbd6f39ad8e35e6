"""The snapshotter interface, and the local implementation overlayfs and native share.

A snapshotter keeps snapshots per namespace: namespace A's "k1" and namespace B's "k1" are
different snapshots, and a parent must live in the caller's namespace. Kinds are containerd's:
ACTIVE (writable, from Prepare), VIEW (read-only, from View) and COMMITTED (from Commit of an
active snapshot; the only kind that can be a parent; its directory is never written again).

Errors are the ones containerd's clients branch on (runtimed.errors, mapped to gRPC codes at
the edge): an unknown key or parent is NotFound ("snapshot K does not exist"), an existing key
or commit name AlreadyExists, Commit of a key that is not active and Mounts of a committed
snapshot FailedPrecondition, a parent that is not committed InvalidArgument, Remove of a
snapshot with children FailedPrecondition ("cannot remove snapshot with child").

LocalSnapshotter stores metadata in its own SQLite file (plugins.snapshotters.store) and each
snapshot's files in <root>/snapshots/<id>/{fs,work}, <id> being the row's never-reused id.

Crash safety (kill -9 at any point leaves a consistent store):
* create: the directory is built under a staging name (snapshots/new-<random>), then renamed to
  snapshots/<id> inside the transaction that inserts the row. A crash before the commit leaves a
  directory no row names; a crash after it leaves both.
* remove: the row is deleted (committed) first, the directory removed afterwards.
* cleanup() (run at open, and by the Cleanup RPC) removes every entry of snapshots/ that no row
  names: staging directories, directories of rolled-back creates, half-removed directories.
So every row always has its directory, and leftovers are reclaimed at the next start.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import structlog

from plugins.snapshotters import fsutil, store
from plugins.snapshotters.store import MetaStore, Record
from plugins.snapshotters.types import Info, Kind, Usage
from runtimed import filters, identifiers, labels
from runtimed.aio import finish_despite_cancel
from runtimed.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from runtimed.types import Mount, now_ns

__all__ = ["Info", "Kind", "LocalSnapshotter", "Snapshotter", "Usage"]

log = structlog.get_logger("runtimed.snapshotter")

T = TypeVar("T")

# The label containerd's unpacker puts on Prepare: the chainID it will commit to. When a
# snapshot of that name exists already, Prepare answers AlreadyExists and the client moves on.
TARGET_LABEL = "containerd.io/snapshot.ref"
WALK_BATCH = 100
STAGING_PREFIX = "new-"
TRASH_PREFIX = "trash-"


class Snapshotter(abc.ABC):
    """What the snapshots service (and the rest of the daemon) uses; every call names the namespace."""

    @abc.abstractmethod
    async def stat(self, namespace: str, key: str) -> Info: ...

    @abc.abstractmethod
    async def update(self, namespace: str, info: Info, paths: Sequence[str] = ()) -> Info:
        """Update labels: paths `labels` (replace all) and `labels.<k>` (set, or delete if empty/absent);
        no paths replaces all labels. Anything else is InvalidArgument."""

    @abc.abstractmethod
    async def usage(self, namespace: str, key: str) -> Usage: ...

    @abc.abstractmethod
    async def mounts(self, namespace: str, key: str) -> list[Mount]:
        """The mounts of an active or view snapshot (what Prepare/View returned)."""

    @abc.abstractmethod
    async def prepare(
        self, namespace: str, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]: ...

    @abc.abstractmethod
    async def view(
        self, namespace: str, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]: ...

    @abc.abstractmethod
    async def commit(
        self, namespace: str, name: str, key: str, labels: Mapping[str, str] | None = None
    ) -> None:
        """Make active `key` committed `name`; the key goes, labels are replaced, not inherited."""

    @abc.abstractmethod
    async def remove(self, namespace: str, key: str) -> None: ...

    @abc.abstractmethod
    def walk(self, namespace: str, filter_exprs: Sequence[str] = ()) -> AsyncIterator[Info]:
        """Snapshots of a namespace in name order, filtered (fields kind, name, parent, labels.*)."""

    async def list(self, namespace: str, filter_exprs: Sequence[str] = ()) -> list[Info]:
        return [info async for info in self.walk(namespace, filter_exprs)]

    @abc.abstractmethod
    async def cleanup(self) -> None:
        """Reclaim disk space of removed or abandoned snapshots."""

    @abc.abstractmethod
    async def has_snapshots(self, namespace: str) -> bool:
        """Whether the namespace holds any snapshot here (namespace deletion must then fail)."""

    async def close(self) -> None:  # noqa: B027 - optional for backends without resources
        """Release resources; closing twice is harmless."""


def adaptor(info: Info) -> filters.Adaptor:
    return filters.adaptor_for(
        {"kind": info.kind.filter_value, "name": info.name, "parent": info.parent},
        info.labels,
        always_present=("kind", "name", "parent"),
    )


def _validate_key(key: str, what: str = "key") -> str:
    if not key:
        raise InvalidArgument(f"snapshot {what} must not be empty")
    return key


class LocalSnapshotter(Snapshotter):
    """Snapshots as directories under a plugin root, metadata in SQLite; subclasses say how to
    populate a new snapshot's directory and which mounts expose it."""

    plugin_id: ClassVar[str] = "local"

    def __init__(self, root: Path, meta: MetaStore) -> None:
        self.root = root
        self.snapshots_dir = root / "snapshots"
        self._meta = meta
        self._log = log.bind(snapshotter=self.plugin_id)
        # Staging directory names of creates under way: cleanup must not take them.
        self._staging: set[str] = set()
        self._cleanup_lock = asyncio.Lock()
        # (record, parent chain) by (namespace, name), for Stat and Mounts; kept coherent by the
        # store (see runtimed.metadata.db.RowCache). A chain never changes under a live snapshot:
        # parents are committed, and a committed snapshot keeps its id and parent.
        self._records = meta.row_cache("snapshots", ("namespace", "name"), max_entries=4096)

    @classmethod
    async def open(cls, root: Path, **kwargs: Any) -> Self:
        """Open (or create) the snapshotter at `root` and reclaim what a crash left behind."""
        root = Path(root)

        def make_dirs() -> None:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            (root / "snapshots").mkdir(mode=0o700, exist_ok=True)

        await asyncio.to_thread(make_dirs)
        meta = MetaStore(root / "metadata.db")
        await meta.open()
        snapshotter = cls(root, meta, **kwargs)
        try:
            await snapshotter.cleanup()
        except BaseException:
            await meta.close()
            raise
        return snapshotter

    # -- paths and the subclass hooks

    def snapshot_dir(self, snapshot_id: int) -> Path:
        return self.snapshots_dir / str(snapshot_id)

    def fs_path(self, snapshot_id: int) -> Path:
        return self.snapshot_dir(snapshot_id) / "fs"

    def work_path(self, snapshot_id: int) -> Path:
        return self.snapshot_dir(snapshot_id) / "work"

    @abc.abstractmethod
    async def _populate(self, staging: Path, kind: Kind, parents: list[int]) -> None:
        """Fill a new snapshot's staging directory (`fs`, `work`...); `parents` nearest first."""

    # Subclasses whose directories take only a few quick file system calls to build (no copy)
    # set this and implement _populate_now: create then runs in one trip to the store's thread.
    populates_quickly: ClassVar[bool] = False

    def _populate_now(self, staging: Path, kind: Kind, parents: list[int]) -> None:
        """_populate, synchronously, on the store's thread (only if populates_quickly)."""
        raise NotImplementedError

    @abc.abstractmethod
    def _mounts(self, snapshot_id: int, kind: Kind, parents: list[int]) -> list[Mount]: ...

    def _check_chain(self, key: str, kind: Kind, parents: list[int]) -> None:
        """Refuse a parent chain this snapshotter cannot mount (before any work is done)."""

    def _usage_path(self, snapshot_id: int) -> Path:
        """What an active snapshot's usage measures (overlay: the upper dir; native: the copy)."""
        return self.fs_path(snapshot_id)

    # -- reads

    async def _lookup(self, namespace: str, key: str) -> tuple[Record, list[int]]:
        """The snapshot's record and its parent chain (cached; treat both as read-only)."""
        return await self._meta.read_cached(
            self._records, (namespace, key), _record_and_chain, namespace, key
        )

    async def stat(self, namespace: str, key: str) -> Info:
        identifiers.validate(namespace, "namespace")
        record, _ = await self._lookup(namespace, key)
        return replace(record.info, labels=dict(record.info.labels))

    async def usage(self, namespace: str, key: str) -> Usage:
        identifiers.validate(namespace, "namespace")
        record = await self._meta.read(store.require, namespace, key)
        if record.info.kind == Kind.ACTIVE:
            # Still being written: measure now (committed usage was recorded at commit).
            return await asyncio.to_thread(fsutil.disk_usage, self._usage_path(record.id))
        return Usage(size=record.size, inodes=record.inodes)

    async def mounts(self, namespace: str, key: str) -> list[Mount]:
        identifiers.validate(namespace, "namespace")
        record, parents = await self._lookup(namespace, key)
        if record.info.kind not in (Kind.ACTIVE, Kind.VIEW):
            raise FailedPrecondition(f"requested snapshot {key} not active or view")
        return self._mounts(record.id, record.info.kind, list(parents))

    async def walk(self, namespace: str, filter_exprs: Sequence[str] = ()) -> AsyncIterator[Info]:
        identifiers.validate(namespace, "namespace")
        matcher = filters.parse_all(filter_exprs)
        after: str | None = None
        while True:
            batch = await self._meta.read(store.page, namespace, after, WALK_BATCH)
            for record in batch:
                if matcher.match(adaptor(record.info)):
                    yield record.info
            if len(batch) < WALK_BATCH:
                return
            after = batch[-1].info.name

    async def has_snapshots(self, namespace: str) -> bool:
        def read(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT 1 FROM snapshots WHERE namespace = ? LIMIT 1", (namespace,)).fetchone()
            return row is not None

        return await self._meta.read(read)

    # -- writes

    async def prepare(
        self, namespace: str, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        return await self._create(namespace, Kind.ACTIVE, key, parent, labels)

    async def view(
        self, namespace: str, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        return await self._create(namespace, Kind.VIEW, key, parent, labels)

    @staticmethod
    def _check_create(
        conn: sqlite3.Connection, namespace: str, key: str, parent: str, new_labels: Mapping[str, str]
    ) -> tuple[int | None, list[int]]:
        """(parent id, parent chain) for a new snapshot, or the error containerd gives."""
        target = new_labels.get(TARGET_LABEL, "")
        if target and store.find(conn, namespace, target) is not None:
            raise AlreadyExists(f"target snapshot {_q(target)}")
        if store.find(conn, namespace, key) is not None:
            raise AlreadyExists(f"snapshot {_q(key)}")
        if not parent:
            return None, []
        parent_record = store.find(conn, namespace, parent)
        if parent_record is None:
            raise NotFound(f"parent snapshot {parent} does not exist")
        if parent_record.info.kind != Kind.COMMITTED:
            raise InvalidArgument(f"parent {_q(parent)} is not committed snapshot")
        return parent_record.id, store.chain(conn, parent_record.id)

    async def _create(
        self, namespace: str, kind: Kind, key: str, parent: str, new_labels: Mapping[str, str] | None
    ) -> list[Mount]:
        identifiers.validate(namespace, "namespace")
        _validate_key(key)
        snapshot_labels = _validated(new_labels, key)
        staging = self.snapshots_dir / f"{STAGING_PREFIX}{secrets.token_hex(8)}"
        if self.populates_quickly:
            return await self._create_quickly(namespace, kind, key, parent, snapshot_labels, staging)
        # Fail fast, before any filesystem work; the transaction below checks again.
        parent_id, parents = await self._meta.read(
            self._check_create, namespace, key, parent, snapshot_labels
        )
        self._check_chain(key, kind, parents)

        self._staging.add(staging.name)  # before it exists: cleanup never sees it unclaimed

        def insert(conn: sqlite3.Connection) -> int:
            if self._check_create(conn, namespace, key, parent, snapshot_labels) != (parent_id, parents):
                raise Unavailable(f"parent snapshot {parent} changed while preparing {key}; retry")
            return self._insert(
                conn, namespace, kind, key, parent_id, snapshot_labels, staging, renamed, parent, parents
            )

        renamed: list[Path] = []
        try:
            await asyncio.to_thread(staging.mkdir, 0o700)
            await self._populate(staging, kind, parents)
            snapshot_id = await finish_despite_cancel(self._meta.write(insert))
        except BaseException:
            await self._undo_create(staging, renamed)
            raise
        finally:
            self._staging.discard(staging.name)
        self._log.debug(
            "snapshot created", namespace=namespace, key=key, parent=parent, kind=kind.name, id=snapshot_id
        )
        return self._mounts(snapshot_id, kind, parents)

    async def _create_quickly(
        self,
        namespace: str,
        kind: Kind,
        key: str,
        parent: str,
        snapshot_labels: dict[str, str],
        staging: Path,
    ) -> list[Mount]:
        """_create in one trip to the store's thread: check, build the directory, rename it into
        place and insert the row in one transaction (the same steps, in the same order)."""
        renamed: list[Path] = []
        built: list[Path] = []

        def create(conn: sqlite3.Connection) -> tuple[int, list[int]]:
            parent_id, parents = self._check_create(conn, namespace, key, parent, snapshot_labels)
            self._check_chain(key, kind, parents)
            built.append(staging)
            staging.mkdir(0o700)
            self._populate_now(staging, kind, parents)
            snapshot_id = self._insert(
                conn, namespace, kind, key, parent_id, snapshot_labels, staging, renamed, parent, parents
            )
            return snapshot_id, parents

        self._staging.add(staging.name)  # before it exists: cleanup never sees it unclaimed
        try:
            snapshot_id, parents = await finish_despite_cancel(self._meta.write(create))
        except BaseException:
            if built:  # refused before any directory was made (e.g. AlreadyExists): nothing to undo
                await self._undo_create(staging, renamed)
            raise
        finally:
            self._staging.discard(staging.name)
        self._log.debug(
            "snapshot created", namespace=namespace, key=key, parent=parent, kind=kind.name, id=snapshot_id
        )
        return self._mounts(snapshot_id, kind, parents)

    def _insert(
        self,
        conn: sqlite3.Connection,
        namespace: str,
        kind: Kind,
        key: str,
        parent_id: int | None,
        snapshot_labels: dict[str, str],
        staging: Path,
        renamed: list[Path],
        parent: str,
        parents: list[int],
    ) -> int:
        """Insert the row and rename the built directory into place, in the caller's transaction."""
        stamp = now_ns()
        cursor = conn.execute(
            "INSERT INTO snapshots(namespace, name, parent_id, kind, labels, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (namespace, key, parent_id, int(kind), _dump_labels(snapshot_labels), stamp, stamp),
        )
        snapshot_id = int(cursor.lastrowid or 0)
        target_dir = self.snapshot_dir(snapshot_id)
        if os.path.lexists(target_dir):
            # Left by a create whose commit failed (the id was handed out again): garbage.
            os.rename(target_dir, self.snapshots_dir / f"{TRASH_PREFIX}{snapshot_id}-{secrets.token_hex(4)}")
        os.rename(staging, target_dir)
        renamed.append(target_dir)
        fsutil.fsync_dir(self.snapshots_dir)  # the rename is durable before the row is
        # Mounts usually follows: the row as written (what a read would build) once committed.
        info = Info(
            name=key, parent=parent, kind=kind, created_at=stamp, updated_at=stamp, labels=snapshot_labels
        )
        record = Record(id=snapshot_id, parent_id=parent_id, info=info, size=0, inodes=0)
        self._meta.cache_on_commit(self._records, (namespace, key), (record, list(parents)))
        return snapshot_id

    async def _undo_create(self, staging: Path, renamed: list[Path]) -> None:
        await finish_despite_cancel(asyncio.to_thread(_discard, staging))
        if renamed:
            # Renamed into place, then the transaction failed (e.g. the disk is full): the
            # directory names no row. Reclaim it now rather than at the next start.
            with contextlib.suppress(Exception):
                await finish_despite_cancel(self.cleanup())

    async def commit(
        self, namespace: str, name: str, key: str, labels: Mapping[str, str] | None = None
    ) -> None:
        identifiers.validate(namespace, "namespace")
        _validate_key(name, "name")
        _validate_key(key)
        committed_labels = _validated(labels, name)

        def check(conn: sqlite3.Connection) -> Record:
            # containerd's order: an existing name wins over everything (the unpacker counts it as done).
            if store.find(conn, namespace, name) is not None:
                raise AlreadyExists(f"snapshot {_q(name)}")
            record = store.require(conn, namespace, key)
            if record.info.kind != Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {_q(key)} is not active")
            return record

        record = await self._meta.read(check)
        usage = await asyncio.to_thread(fsutil.disk_usage, self._usage_path(record.id))

        def update(conn: sqlite3.Connection) -> None:
            if check(conn).id != record.id:
                raise Unavailable(f"snapshot {_q(key)} changed while being committed; retry")
            stamp = now_ns()
            conn.execute(
                "UPDATE snapshots SET name = ?, kind = ?, labels = ?, created_at = ?, updated_at = ?,"
                " size = ?, inodes = ? WHERE id = ?",
                (
                    name,
                    int(Kind.COMMITTED),
                    _dump_labels(committed_labels),
                    stamp,
                    stamp,
                    usage.size,
                    usage.inodes,
                    record.id,
                ),
            )

        await finish_despite_cancel(self._meta.write(update))
        self._log.debug("snapshot committed", namespace=namespace, key=key, name=name, id=record.id)

    async def remove(self, namespace: str, key: str) -> None:
        identifiers.validate(namespace, "namespace")

        def delete(conn: sqlite3.Connection) -> int:
            record = store.require(conn, namespace, key)
            if store.has_children(conn, record.id):
                raise FailedPrecondition("cannot remove snapshot with child")
            conn.execute("DELETE FROM snapshots WHERE id = ?", (record.id,))
            return record.id

        try:
            snapshot_id = await finish_despite_cancel(self._meta.write(delete))
        except sqlite3.OperationalError as exc:
            if "full" not in str(exc):
                raise
            snapshot_id = await self._remove_on_full_disk(namespace, key, delete, exc)
        self._log.debug("snapshot removed", namespace=namespace, key=key, id=snapshot_id)
        # The row is gone for good; a directory this fails to remove is an orphan for cleanup().
        try:
            await finish_despite_cancel(asyncio.to_thread(_discard, self.snapshot_dir(snapshot_id)))
        except OSError as exc:
            self._log.warning("snapshot directory left for cleanup", id=snapshot_id, error=str(exc))

    async def _remove_on_full_disk(
        self, namespace: str, key: str, delete: Callable[[sqlite3.Connection], int], exc: Exception
    ) -> int:
        """Remove an active or view snapshot when the disk is too full to delete its row.

        Often this very snapshot filled the disk (a container writing until ENOSPC): empty its
        directory first, which the removal was about to discard anyway, then delete the row.
        The row keeps its (empty) directory throughout, so a crash in between stays consistent.
        A committed snapshot is never emptied before its row is gone.
        """

        def find(conn: sqlite3.Connection) -> Record:
            record = store.require(conn, namespace, key)
            if store.has_children(conn, record.id):
                raise FailedPrecondition("cannot remove snapshot with child")
            return record

        record = await self._meta.read(find)
        if record.info.kind == Kind.COMMITTED:
            raise exc
        self._log.warning("disk full: emptying snapshot before removing it", key=key, id=record.id)

        def empty(directory: Path) -> None:
            for part in ("fs", "work"):
                with contextlib.suppress(FileNotFoundError):
                    for entry in os.scandir(directory / part):
                        fsutil.remove_tree(Path(entry.path))

        await finish_despite_cancel(asyncio.to_thread(empty, self.snapshot_dir(record.id)))
        return await finish_despite_cancel(self._meta.write(delete))

    async def update(self, namespace: str, info: Info, paths: Sequence[str] = ()) -> Info:
        identifiers.validate(namespace, "namespace")
        if not info.name:
            raise InvalidArgument("snapshot name must not be empty")
        incoming = labels.validate(info.labels, f"snapshot {_q(info.name)}")

        def write(conn: sqlite3.Connection) -> Info:
            record = store.require(conn, namespace, info.name)
            current = dict(record.info.labels)
            for path in paths or ["labels"]:
                if not labels.apply_mask_path(current, incoming, path):
                    raise InvalidArgument(f"cannot update {_q(path)} field on snapshot {_q(info.name)}")
            current = {k: v for k, v in labels.validate(current, f"snapshot {_q(info.name)}").items() if v}
            stamp = now_ns()
            conn.execute(
                "UPDATE snapshots SET labels = ?, updated_at = ? WHERE id = ?",
                (_dump_labels(current), stamp, record.id),
            )
            record.info.labels = current
            record.info.updated_at = stamp
            return record.info

        return await finish_despite_cancel(self._meta.write(write))

    async def cleanup(self) -> None:
        async with self._cleanup_lock:

            def claim(conn: sqlite3.Connection) -> list[Path]:
                # On the store's thread, so no create can commit between reading the ids and
                # listing the directory; orphans are renamed to trash names right away so an id
                # handed out again later never meets its old directory.
                live = {str(i) for i in store.ids(conn)}
                mounted = fsutil.mount_points()
                doomed = []
                for entry in os.listdir(self.snapshots_dir):
                    if entry in live or entry in self._staging:
                        continue
                    path = self.snapshots_dir / entry
                    inner = fsutil.mounts_inside(path, mounted)
                    if inner:
                        # Renaming would move the mount out from under whoever unmounts it later.
                        self._log.warning(
                            "orphan snapshot directory still has mounts", path=str(path), mounts=inner
                        )
                        continue
                    if entry.isdigit():
                        trash = self.snapshots_dir / f"{TRASH_PREFIX}{entry}-{secrets.token_hex(4)}"
                        os.rename(path, trash)
                        path = trash
                    doomed.append(path)
                return doomed

            doomed = await self._meta.read(claim)
            for path in doomed:
                try:
                    await finish_despite_cancel(asyncio.to_thread(_discard, path))
                    self._log.info("reclaimed snapshot directory", path=str(path))
                except OSError as exc:
                    self._log.warning("cannot reclaim snapshot directory", path=str(path), error=str(exc))

    async def close(self) -> None:
        await self._meta.close()


def _record_and_chain(conn: sqlite3.Connection, namespace: str, key: str) -> tuple[Record, list[int]]:
    record = store.require(conn, namespace, key)
    return record, store.chain(conn, record.parent_id)


def _q(value: str) -> str:
    """Quote like Go's %q, as containerd's messages do."""
    return json.dumps(value, ensure_ascii=False)


def _validated(new_labels: Mapping[str, str] | None, name: str) -> dict[str, str]:
    """Valid labels without empty values (containerd never stores those)."""
    return {k: v for k, v in labels.validate(new_labels or {}, f"snapshot {_q(name)}").items() if v}


def _dump_labels(value: Mapping[str, str]) -> str:
    return json.dumps(dict(sorted(value.items())))


def _discard(path: Path) -> None:
    """Remove a snapshot or staging directory if it exists (never across a mount inside it)."""
    with contextlib.suppress(FileNotFoundError):
        fsutil.remove_tree(path)
