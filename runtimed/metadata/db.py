"""The metadata database: one SQLite file in WAL mode, one transaction per mutating call.

All SQLite work runs on one dedicated thread, so the event loop never blocks on disk
and writers are serialised without lock juggling. Schema changes are numbered
migrations recorded in PRAGMA user_version.

Schema (every namespaced table is keyed by namespace first):

    namespaces(name, labels, created_at, updated_at)
    containers(namespace, id, labels, image, runtime_name, runtime_options, spec,
               snapshotter, snapshot_key, sandbox, extensions, created_at, updated_at)
    images(namespace, name, labels, target_media_type, target_digest, target_size,
           target_annotations, created_at, updated_at)
    leases(namespace, id, labels, created_at)
    lease_resources(namespace, lease_id, resource_type, resource_id)
    content(namespace, digest, size, labels, created_at, updated_at)
    volumes(namespace, name, labels, created_at)

Labels and annotations are JSON objects; Any values are serialised protobuf Any bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import structlog

from runtimed.errors import FailedPrecondition, Internal

log = structlog.get_logger("runtimed.metadata")

T = TypeVar("T")

MIGRATIONS: list[str] = [
    # 1: the control plane
    """
    CREATE TABLE namespaces (
        name TEXT PRIMARY KEY,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE containers (
        namespace TEXT NOT NULL REFERENCES namespaces(name),
        id TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        image TEXT NOT NULL DEFAULT '',
        runtime_name TEXT NOT NULL,
        runtime_options BLOB,
        spec BLOB,
        snapshotter TEXT NOT NULL DEFAULT '',
        snapshot_key TEXT NOT NULL DEFAULT '',
        sandbox TEXT NOT NULL DEFAULT '',
        extensions BLOB,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, id)
    );
    CREATE TABLE images (
        namespace TEXT NOT NULL REFERENCES namespaces(name),
        name TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        target_media_type TEXT NOT NULL,
        target_digest TEXT NOT NULL,
        target_size INTEGER NOT NULL,
        target_annotations TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, name)
    );
    CREATE TABLE leases (
        namespace TEXT NOT NULL REFERENCES namespaces(name),
        id TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, id)
    );
    CREATE TABLE lease_resources (
        namespace TEXT NOT NULL,
        lease_id TEXT NOT NULL,
        resource_type TEXT NOT NULL,
        resource_id TEXT NOT NULL,
        PRIMARY KEY (namespace, lease_id, resource_type, resource_id),
        FOREIGN KEY (namespace, lease_id) REFERENCES leases(namespace, id) ON DELETE CASCADE
    );
    """,
    # content: which namespaces see which blob (the bytes live in the content plugin's blobs/)
    """
    CREATE TABLE content (
        namespace TEXT NOT NULL REFERENCES namespaces(name),
        digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, digest)
    );
    CREATE INDEX content_by_digest ON content(digest);
    """,
    # volumes: named directories that outlive containers (the data lives under the volumes plugin's root)
    """
    CREATE TABLE volumes (
        namespace TEXT NOT NULL REFERENCES namespaces(name),
        name TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, name)
    );
    """,
]

# Tables whose rows make a namespace non-empty (grows as content and snapshots land).
NAMESPACED_TABLES: dict[str, str] = {"containers": "containers", "images": "images", "leases": "leases"}
NAMESPACED_TABLES["content"] = "content"
NAMESPACED_TABLES["volumes"] = "volumes"

SYNC_MODES = ("full", "normal")

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_DROP_FUNCTION = "runtimed_cache_drop"


class RowCache(Generic[K, V]):
    """Values built from recently read rows of one table, by the row's key columns.

    Hot reads (a namespace, an image, a container, a content record) are answered from here
    without a trip to the database thread. Only that thread changes the cache: a cached read
    stores what it read inside its read transaction (committed state), and a TEMP trigger on
    the table drops a key as soon as any statement inserts, updates or deletes its row, from
    whatever code, before that write's transaction ends. The event loop only looks entries up,
    so an entry is never older than the last write whose completion the loop has seen. Values
    must be treated as immutable by whoever gets them. Bounded: the oldest entry goes first.
    """

    def __init__(self, table: str, key_columns: Sequence[str], max_entries: int) -> None:
        self.table = table
        self.key_columns = tuple(key_columns)
        self._max = max_entries
        self._entries: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        return self._entries.get(key)

    def put(self, key: K, value: V) -> None:
        """Database thread only, inside a read transaction."""
        entries = self._entries
        if key not in entries and len(entries) >= self._max:
            entries.pop(next(iter(entries)), None)
        entries[key] = value

    def drop(self, key: K) -> None:
        """Database thread only."""
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def triggers(self) -> list[str]:
        old = ", ".join(f"OLD.{c}" for c in self.key_columns)
        new = ", ".join(f"NEW.{c}" for c in self.key_columns)
        head = f"CREATE TEMP TRIGGER IF NOT EXISTS {_DROP_FUNCTION}_{self.table}"
        on = f"ON main.{self.table} BEGIN SELECT {_DROP_FUNCTION}('{self.table}'"
        return [
            f"{head}_insert AFTER INSERT {on}, {new}); END",
            f"{head}_update AFTER UPDATE {on}, {old}, {new}); END",
            f"{head}_delete AFTER DELETE {on}, {old}); END",
        ]


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class _Worker:
    """One thread running submitted calls in order; cheaper per call than a ThreadPoolExecutor
    with run_in_executor (no concurrent future to chain, no idle-semaphore bookkeeping)."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def _put(self, item: Any) -> None:
        if not self._thread.is_alive() and self._thread.ident is None:
            self._thread.start()
        self._queue.put(item)

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._put((loop, future, fn, args))
        return future

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            loop, future, fn, args = item
            if future is None:
                fn(*args)
                continue
            if future.cancelled():  # like a cancelled executor job that had not started
                continue
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the awaiting task
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                loop.call_soon_threadsafe(_resolve, future, result, error)
            del item, future, result, error

    def submit_nowait(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue fn(*args) without waiting for it (errors are logged)."""

        def run() -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("database thread job failed")

        self._put((None, None, run, ()))

    def shutdown(self) -> None:
        if self._thread.ident is not None:
            self._queue.put(None)
            self._thread.join()


class Database:
    """One SQLite file, its migrations, and the single thread every call on it runs on.

    Also used by other stores that keep their own file (the snapshotters), with their
    own migrations and name.
    """

    def __init__(
        self,
        path: Path,
        *,
        sync: str = "full",
        migrations: Sequence[str] = MIGRATIONS,
        name: str = "metadata",
    ) -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}")
        self.path = path
        self._sync = sync
        self._migrations = list(migrations)
        self._name = name
        self._worker = _Worker(f"{name}-db")
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._caches: dict[str, RowCache[Any, Any]] = {}
        # Values a write transaction stores in a cache once it commits (database thread only).
        self._on_commit: list[tuple[RowCache[Any, Any], Any, Any]] = []

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL survives power loss; NORMAL survives a daemon crash (kill -9) but not power loss.
            conn.execute(f"PRAGMA synchronous={self._sync.upper()}")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            self._migrate(conn)
            conn.create_function(_DROP_FUNCTION, -1, self._drop_cached)
            for cache in self._caches.values():
                self._install(conn, cache)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        latest = len(self._migrations)
        if version > latest:
            raise FailedPrecondition(
                f"{self._name} database {self.path} has schema {version}, newer than this runtimed "
                f"({latest}); refusing to downgrade"
            )
        for number, script in enumerate(self._migrations[version:], start=version + 1):
            log.info("migrating schema", database=self._name, path=str(self.path), version=number)
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={number}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise Internal(f"{self._name} database {self.path} is closed")
        return await self._worker.submit(fn, *args)

    # -- row caches

    def row_cache(
        self, table: str, key_columns: Sequence[str], max_entries: int = 4096
    ) -> RowCache[Any, Any]:
        """A RowCache of `table` keyed by `key_columns`, kept coherent by TEMP triggers."""
        existing = self._caches.get(table)
        if existing is not None:
            # A second store over the same table (e.g. reopened on the same database) shares it.
            if existing.key_columns != tuple(key_columns):
                raise ValueError(f"{table} already has a row cache keyed by {existing.key_columns}")
            return existing
        cache: RowCache[Any, Any] = RowCache(table, key_columns, max_entries)
        self._caches[table] = cache
        if self._conn is not None:
            # Queued on the database thread ahead of any read that could fill the cache.
            self._worker.submit_nowait(self._install, self._conn, cache)
        return cache

    @staticmethod
    def _install(conn: sqlite3.Connection, cache: RowCache[Any, Any]) -> None:
        for statement in cache.triggers():
            conn.execute(statement)

    def _drop_cached(self, table: str, *values: Any) -> None:
        """The triggers' callback, on the database thread: forget the changed row(s)."""
        cache = self._caches.get(table)
        if cache is None:
            return
        width = len(cache.key_columns)
        for start in range(0, len(values), width):
            key = values[start : start + width]
            key = key[0] if width == 1 else key
            cache.drop(key)
            if self._on_commit:  # a later change of the row outdates what was to be stored
                self._on_commit = [p for p in self._on_commit if not (p[0] is cache and p[1] == key)]

    def cache_on_commit(self, cache: RowCache[K, V], key: K, value: V) -> None:
        """From inside a write: store `value` (the row as written) under `key` once the write
        commits, unless the row changes again before that. Saves the next read its trip here."""
        self._on_commit.append((cache, key, value))

    async def read_cached(self, cache: RowCache[K, V], key: K, fn: Callable[..., V], *args: Any) -> V:
        """cache[key], or fn(conn, *args) in a read transaction, remembered under key."""
        value = cache.get(key)
        if value is not None:
            return value

        def run() -> V:
            conn = self._conn_or_fail()
            conn.execute("BEGIN")
            try:
                value = fn(conn, *args)
                cache.put(key, value)
                return value
            finally:
                conn.execute("COMMIT")

        return await self._run(run)

    def _conn_or_fail(self) -> sqlite3.Connection:
        if self._conn is None:
            raise Internal(f"{self._name} database {self.path} is not open")
        return self._conn

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(conn, *args) in a read transaction (a consistent snapshot)."""

        def run() -> T:
            conn = self._conn_or_fail()
            conn.execute("BEGIN")
            try:
                return fn(conn, *args)
            finally:
                conn.execute("COMMIT")

        return await self._run(run)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(conn, *args) in one write transaction: all of it commits, or none."""

        def run() -> T:
            conn = self._conn_or_fail()
            conn.execute("BEGIN IMMEDIATE")
            try:
                try:
                    result = fn(conn, *args)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                for cache, key, value in self._on_commit:
                    cache.put(key, value)
            finally:
                self._on_commit.clear()
            return result

        return await self._run(run)

    async def close(self) -> None:
        """Close the database; closing twice is harmless."""
        if self._closed:
            return
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._run(conn.close)
        self._closed = True
        for cache in self._caches.values():
            cache.clear()
        self._worker.shutdown()
