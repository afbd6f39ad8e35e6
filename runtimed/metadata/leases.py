"""Leases: client-held references that keep the resources created under them from GC."""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Sequence

from runtimed import filters, identifiers, labels
from runtimed.errors import AlreadyExists, InvalidArgument, NotFound, q
from runtimed.metadata import namespaces
from runtimed.metadata.db import Database
from runtimed.types import Lease, LeaseResource, now_ns

RESOURCE_TYPES = ("content", "ingests")
SNAPSHOT_RESOURCE_PREFIX = "snapshots/"


def generate_id() -> str:
    return f"{now_ns()}-{secrets.token_hex(4)}"


def validate_resource(resource: LeaseResource) -> LeaseResource:
    if not resource.id:
        raise InvalidArgument("lease resource id must not be empty")
    if resource.type not in RESOURCE_TYPES and not (
        resource.type.startswith(SNAPSHOT_RESOURCE_PREFIX)
        and len(resource.type) > len(SNAPSHOT_RESOURCE_PREFIX)
    ):
        raise InvalidArgument(
            f"lease resource type {q(resource.type)} must be content, ingests or snapshots/<snapshotter>"
        )
    return resource


def _row(row: sqlite3.Row) -> Lease:
    return Lease(id=row["id"], labels=json.loads(row["labels"]), created_at=row["created_at"])


def _require(conn: sqlite3.Connection, namespace: str, lease_id: str) -> None:
    if (
        conn.execute("SELECT 1 FROM leases WHERE namespace = ? AND id = ?", (namespace, lease_id)).fetchone()
        is None
    ):
        raise NotFound(f"lease {q(lease_id)}")


class LeaseStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, namespace: str, lease_id: str, lease_labels: dict[str, str]) -> Lease:
        lease = Lease(
            id=lease_id or generate_id(), labels=labels.validate(lease_labels, "lease"), created_at=now_ns()
        )
        identifiers.validate_lease_id(lease.id)

        def write(conn: sqlite3.Connection) -> None:
            namespaces.ensure(conn, namespace)
            try:
                conn.execute(
                    "INSERT INTO leases(namespace, id, labels, created_at) VALUES (?, ?, ?, ?)",
                    (namespace, lease.id, json.dumps(lease.labels), lease.created_at),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"lease {q(lease.id)}") from None

        await self._db.write(write)
        return lease

    async def delete(self, namespace: str, lease_id: str) -> None:
        identifiers.validate_lease_id(lease_id)

        def write(conn: sqlite3.Connection) -> None:
            if (
                conn.execute(
                    "DELETE FROM leases WHERE namespace = ? AND id = ?", (namespace, lease_id)
                ).rowcount
                == 0
            ):
                raise NotFound(f"lease {q(lease_id)}")

        await self._db.write(write)

    async def list(self, namespace: str, filter_exprs: Sequence[str] = ()) -> list[Lease]:
        matcher = filters.parse_all(filter_exprs)

        def read(conn: sqlite3.Connection) -> list[Lease]:
            rows = conn.execute(
                "SELECT * FROM leases WHERE namespace = ? ORDER BY created_at, id", (namespace,)
            )
            return [
                lease
                for lease in map(_row, rows)
                if matcher.match(filters.adaptor_for({"id": lease.id}, lease.labels))
            ]

        return await self._db.read(read)

    async def add_resource(
        self, namespace: str, lease_id: str, resource: LeaseResource, *, ensure_namespace: bool = False
    ) -> None:
        """Add a resource to a lease; ensure_namespace also creates the namespace first, in the
        same transaction (committed even when the lease turns out not to exist)."""
        identifiers.validate_lease_id(lease_id)
        validate_resource(resource)

        def write(conn: sqlite3.Connection) -> bool:
            if ensure_namespace:
                namespaces.ensure(conn, namespace)
            query = "SELECT 1 FROM leases WHERE namespace = ? AND id = ?"
            if conn.execute(query, (namespace, lease_id)).fetchone() is None:
                return False
            conn.execute(
                "INSERT OR IGNORE INTO lease_resources(namespace, lease_id, resource_type, resource_id)"
                " VALUES (?, ?, ?, ?)",
                (namespace, lease_id, resource.type, resource.id),
            )
            return True

        if not await self._db.write(write):
            raise NotFound(f"lease {q(lease_id)}")

    async def delete_resource(self, namespace: str, lease_id: str, resource: LeaseResource) -> None:
        identifiers.validate_lease_id(lease_id)
        validate_resource(resource)

        def write(conn: sqlite3.Connection) -> None:
            _require(conn, namespace, lease_id)
            conn.execute(
                "DELETE FROM lease_resources WHERE namespace = ? AND lease_id = ? AND resource_type = ?"
                " AND resource_id = ?",
                (namespace, lease_id, resource.type, resource.id),
            )

        await self._db.write(write)

    async def list_resources(self, namespace: str, lease_id: str) -> list[LeaseResource]:
        identifiers.validate_lease_id(lease_id)

        def read(conn: sqlite3.Connection) -> list[LeaseResource]:
            _require(conn, namespace, lease_id)
            rows = conn.execute(
                "SELECT resource_type, resource_id FROM lease_resources WHERE namespace = ? AND lease_id = ?"
                " ORDER BY resource_type, resource_id",
                (namespace, lease_id),
            )
            return [LeaseResource(id=r["resource_id"], type=r["resource_type"]) for r in rows]

        return await self._db.read(read)
