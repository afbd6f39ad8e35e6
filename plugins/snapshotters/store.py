"""A snapshotter's own metadata: one SQLite file under its plugin root, WAL, one transaction per mutation.

The conventions are runtimed.metadata.db's: every SQLite call runs on one dedicated thread (so
the event loop never blocks and writers are serialised), schema changes are numbered migrations
recorded in PRAGMA user_version.

Schema:

    snapshots(id, namespace, name, parent_id, kind, labels, created_at, updated_at, size, inodes)

`id` is the snapshot's directory name (<root>/snapshots/<id>); AUTOINCREMENT means an id is never
handed out twice, so a directory left behind by a crash can never be mistaken for a live
snapshot's. `name` is the key of an active or view snapshot and the name of a committed one,
unique per namespace. `parent_id` points at a committed snapshot of the same namespace; the
foreign key keeps a parent from disappearing under its children. `size`/`inodes` are the usage
recorded at commit.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import structlog

from plugins.snapshotters.types import Info, Kind
from runtimed.errors import NotFound
from runtimed.metadata.db import Database

log = structlog.get_logger("runtimed.snapshotter")

T = TypeVar("T")

MIGRATIONS: list[str] = [
    # 1: snapshots
    """
    CREATE TABLE snapshots (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        parent_id INTEGER REFERENCES snapshots(id),
        kind INTEGER NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        size INTEGER NOT NULL DEFAULT 0,
        inodes INTEGER NOT NULL DEFAULT 0,
        UNIQUE (namespace, name)
    );
    CREATE INDEX snapshots_parent ON snapshots(parent_id);
    """,
]

_SELECT = (
    "SELECT s.id, s.name, s.parent_id, s.kind, s.labels, s.created_at, s.updated_at, s.size, s.inodes,"
    " COALESCE(p.name, '') AS parent_name FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id"
)


@dataclass(frozen=True)
class Record:
    """One snapshot row: the public Info plus what only the snapshotter needs."""

    id: int
    parent_id: int | None
    info: Info
    size: int
    inodes: int


def _record(row: sqlite3.Row) -> Record:
    return Record(
        id=row["id"],
        parent_id=row["parent_id"],
        info=Info(
            name=row["name"],
            parent=row["parent_name"],
            kind=Kind(row["kind"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            labels=json.loads(row["labels"]),
        ),
        size=row["size"],
        inodes=row["inodes"],
    )


def find(conn: sqlite3.Connection, namespace: str, name: str) -> Record | None:
    row = conn.execute(f"{_SELECT} WHERE s.namespace = ? AND s.name = ?", (namespace, name)).fetchone()
    return None if row is None else _record(row)


def require(conn: sqlite3.Connection, namespace: str, name: str) -> Record:
    record = find(conn, namespace, name)
    if record is None:
        raise NotFound(f"snapshot {name} does not exist")
    return record


def page(conn: sqlite3.Connection, namespace: str, after: str | None, limit: int) -> list[Record]:
    """Snapshots of a namespace in name order (byte order, like containerd's bolt keys), after `after`."""
    if after is None:
        rows = conn.execute(f"{_SELECT} WHERE s.namespace = ? ORDER BY s.name LIMIT ?", (namespace, limit))
    else:
        rows = conn.execute(
            f"{_SELECT} WHERE s.namespace = ? AND s.name > ? ORDER BY s.name LIMIT ?",
            (namespace, after, limit),
        )
    return [_record(row) for row in rows]


def chain(conn: sqlite3.Connection, parent_id: int | None) -> list[int]:
    """Directory ids from `parent_id` (the immediate parent) down to the base layer."""
    if parent_id is None:
        return []
    rows = conn.execute(
        "WITH RECURSIVE up(id, parent_id, depth) AS ("
        " SELECT id, parent_id, 0 FROM snapshots WHERE id = ?"
        " UNION ALL SELECT s.id, s.parent_id, up.depth + 1 FROM snapshots s JOIN up ON s.id = up.parent_id)"
        " SELECT id FROM up ORDER BY depth",
        (parent_id,),
    )
    return [row["id"] for row in rows]


def has_children(conn: sqlite3.Connection, snapshot_id: int) -> bool:
    return (
        conn.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (snapshot_id,)).fetchone()
        is not None
    )


def ids(conn: sqlite3.Connection) -> set[int]:
    return {row["id"] for row in conn.execute("SELECT id FROM snapshots")}


class MetaStore(Database):
    """The snapshotter's own SQLite file, with runtimed.metadata.db's threading and migrations."""

    def __init__(self, path: Path, *, sync: str = "full") -> None:
        super().__init__(path, sync=sync, migrations=MIGRATIONS, name="snapshot")
