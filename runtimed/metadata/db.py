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
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

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
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-db")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

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
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

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
                result = fn(conn, *args)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
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
        self._executor.shutdown(wait=True)
