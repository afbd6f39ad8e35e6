"""Namespaces: the tenant boundary. Created explicitly or implicitly by the first write."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Awaitable, Callable, Sequence

from runtimed import filters, identifiers, labels
from runtimed.api.containerd.events import namespace_pb2 as events_pb2
from runtimed.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, q
from runtimed.events.exchange import Exchange
from runtimed.metadata.db import NAMESPACED_TABLES, Database
from runtimed.types import Namespace, now_ns

# What else keeps a namespace in use (stores outside this database, e.g. snapshotters):
# returns the names of what the namespace still has, e.g. ['snapshots on "overlayfs" snapshotter'].
InUseCheck = Callable[[str], Awaitable[list[str]]]


def ensure(conn: sqlite3.Connection, namespace: str) -> None:
    """Create `namespace` inside the caller's transaction if it does not exist yet."""
    stamp = now_ns()
    conn.execute(
        "INSERT OR IGNORE INTO namespaces(name, labels, created_at, updated_at) VALUES (?, '{}', ?, ?)",
        (namespace, stamp, stamp),
    )


def _row(row: sqlite3.Row) -> Namespace:
    return Namespace(name=row["name"], labels=json.loads(row["labels"]))


def _get(conn: sqlite3.Connection, name: str) -> Namespace:
    row = conn.execute("SELECT * FROM namespaces WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise NotFound(f"namespace {q(name)}")
    return _row(row)


def _adaptor(namespace: Namespace) -> filters.Adaptor:
    return filters.adaptor_for({"name": namespace.name}, namespace.labels)


class NamespaceStore:
    def __init__(self, db: Database, events: Exchange) -> None:
        self._db = db
        self._events = events
        self._in_use_checks: list[InUseCheck] = []
        self._cache = db.row_cache("namespaces", ("name",), max_entries=1024)

    def add_in_use_check(self, check: InUseCheck) -> None:
        self._in_use_checks.append(check)

    async def get(self, name: str) -> Namespace:
        identifiers.validate(name, "namespace")
        namespace = await self._db.read_cached(self._cache, name, _get, name)
        return Namespace(name=namespace.name, labels=dict(namespace.labels))

    async def list(self, filter_exprs: Sequence[str] = ()) -> list[Namespace]:
        matcher = filters.parse_all(filter_exprs)

        def read(conn: sqlite3.Connection) -> list[Namespace]:
            rows = conn.execute("SELECT * FROM namespaces ORDER BY name").fetchall()
            return [ns for ns in map(_row, rows) if matcher.match(_adaptor(ns))]

        return await self._db.read(read)

    async def create(self, namespace: Namespace) -> Namespace:
        identifiers.validate(namespace.name, "namespace")
        labels.validate(namespace.labels, f"namespace {q(namespace.name)}")

        def write(conn: sqlite3.Connection) -> None:
            stamp = now_ns()
            try:
                conn.execute(
                    "INSERT INTO namespaces(name, labels, created_at, updated_at) VALUES (?, ?, ?, ?)",
                    (namespace.name, json.dumps(namespace.labels), stamp, stamp),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"namespace {q(namespace.name)}") from None

        await self._db.write(write)
        self._events.publish(
            namespace.name,
            "/namespaces/create",
            events_pb2.NamespaceCreate(name=namespace.name, labels=namespace.labels),
        )
        return namespace

    async def update(self, namespace: Namespace, paths: Sequence[str]) -> Namespace:
        identifiers.validate(namespace.name, "namespace")
        labels.validate(namespace.labels, f"namespace {q(namespace.name)}")

        def write(conn: sqlite3.Connection) -> Namespace:
            row = conn.execute("SELECT * FROM namespaces WHERE name = ?", (namespace.name,)).fetchone()
            if row is None:
                raise NotFound(f"namespace {q(namespace.name)}")
            current = _row(row)
            for path in paths or ["labels"]:
                if not labels.apply_mask_path(current.labels, namespace.labels, path):
                    raise InvalidArgument(f"cannot update {q(path)} field on namespace {q(namespace.name)}")
            conn.execute(
                "UPDATE namespaces SET labels = ?, updated_at = ? WHERE name = ?",
                (json.dumps(current.labels), now_ns(), namespace.name),
            )
            return current

        updated = await self._db.write(write)
        self._events.publish(
            updated.name,
            "/namespaces/update",
            events_pb2.NamespaceUpdate(name=updated.name, labels=updated.labels),
        )
        return updated

    async def delete(self, name: str) -> None:
        identifiers.validate(name, "namespace")
        # Outside the transaction (other stores); a NotFound below still takes precedence.
        elsewhere = [kind for check in self._in_use_checks for kind in await check(name)]

        def write(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM namespaces WHERE name = ?", (name,)).fetchone() is None:
                raise NotFound(f"namespace {q(name)}")
            in_use = [
                kind
                for kind, table in NAMESPACED_TABLES.items()
                if conn.execute(f"SELECT 1 FROM {table} WHERE namespace = ? LIMIT 1", (name,)).fetchone()
            ]
            in_use += elsewhere
            if in_use:
                raise FailedPrecondition(
                    f"namespace {q(name)} must be empty, but it still has {', '.join(in_use)}"
                )
            conn.execute("DELETE FROM namespaces WHERE name = ?", (name,))

        await self._db.write(write)
        self._events.publish(name, "/namespaces/delete", events_pb2.NamespaceDelete(name=name))
