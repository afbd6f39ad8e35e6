"""Containers: metadata records (spec, runtime, snapshot key) in a namespace.

Field rules, as in containerd: id is an identifier and immutable; runtime.name is
required and immutable; spec is required; snapshotter is required when
snapshot_key is set and immutable. Updatable: labels (and labels.<k>), spec,
extensions (and extensions.<k>), image, snapshotkey.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import replace

from google.protobuf import any_pb2

from runtimed import filters, identifiers, labels
from runtimed.api.containerd.events import container_pb2 as events_pb2
from runtimed.errors import AlreadyExists, InvalidArgument, NotFound, q
from runtimed.events.exchange import Exchange
from runtimed.metadata import namespaces
from runtimed.metadata.db import Database
from runtimed.types import AnyValue, Container, RuntimeInfo, now_ns

UPDATABLE_ON_FULL_REPLACE = ("labels", "spec", "extensions", "image", "snapshotkey")


def encode_any(value: AnyValue | None) -> bytes | None:
    if value is None:
        return None
    return any_pb2.Any(type_url=value.type_url, value=value.value).SerializeToString()


def decode_any(data: bytes | None) -> AnyValue | None:
    if data is None:
        return None
    message = any_pb2.Any.FromString(data)
    return AnyValue(type_url=message.type_url, value=message.value)


def _encode_extensions(extensions: dict[str, AnyValue]) -> str:
    return json.dumps(
        {k: [v.type_url, base64.b64encode(v.value).decode()] for k, v in sorted(extensions.items())}
    )


def _decode_extensions(text: str | bytes | None) -> dict[str, AnyValue]:
    if not text:
        return {}
    return {k: AnyValue(type_url=t, value=base64.b64decode(v)) for k, (t, v) in json.loads(text).items()}


def _row(row: sqlite3.Row) -> Container:
    return Container(
        id=row["id"],
        labels=json.loads(row["labels"]),
        image=row["image"],
        runtime=RuntimeInfo(name=row["runtime_name"], options=decode_any(row["runtime_options"])),
        spec=decode_any(row["spec"]),
        snapshotter=row["snapshotter"],
        snapshot_key=row["snapshot_key"],
        sandbox=row["sandbox"],
        extensions=_decode_extensions(row["extensions"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def adaptor(container: Container) -> filters.Adaptor:
    return filters.adaptor_for(
        {
            "id": container.id,
            "image": container.image,
            "runtime.name": container.runtime.name,
            "snapshotter": container.snapshotter,
            "snapshot_key": container.snapshot_key,
            "sandbox": container.sandbox,
        },
        container.labels,
    )


def validate(container: Container) -> None:
    identifiers.validate(container.id, "container id")
    labels.validate(container.labels, f"container {q(container.id)}")
    if not container.runtime.name:
        raise InvalidArgument(f"container {q(container.id)}: runtime.name must be set")
    if container.spec is None:
        raise InvalidArgument(f"container {q(container.id)}: spec must be set")
    if container.snapshot_key and not container.snapshotter:
        raise InvalidArgument(f"container {q(container.id)}: snapshotter must be set when snapshot_key is")


def _write_row(conn: sqlite3.Connection, namespace: str, c: Container, *, insert: bool) -> None:
    values = (
        json.dumps(c.labels),
        c.image,
        c.runtime.name,
        encode_any(c.runtime.options),
        encode_any(c.spec),
        c.snapshotter,
        c.snapshot_key,
        c.sandbox,
        _encode_extensions(c.extensions),
        c.created_at,
        c.updated_at,
    )
    if insert:
        conn.execute(
            "INSERT INTO containers(labels, image, runtime_name, runtime_options, spec, snapshotter,"
            " snapshot_key, sandbox, extensions, created_at, updated_at, namespace, id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*values, namespace, c.id),
        )
    else:
        conn.execute(
            "UPDATE containers SET labels = ?, image = ?, runtime_name = ?, runtime_options = ?, spec = ?,"
            " snapshotter = ?, snapshot_key = ?, sandbox = ?, extensions = ?, created_at = ?, updated_at = ?"
            " WHERE namespace = ? AND id = ?",
            (*values, namespace, c.id),
        )


def _get(conn: sqlite3.Connection, namespace: str, container_id: str) -> Container:
    row = conn.execute(
        "SELECT * FROM containers WHERE namespace = ? AND id = ?", (namespace, container_id)
    ).fetchone()
    if row is None:
        raise NotFound(f"container {q(container_id)}")
    return _row(row)


def _merge(current: Container, incoming: Container, paths: Sequence[str]) -> Container:
    updated = replace(current, labels=dict(current.labels), extensions=dict(current.extensions))
    if not paths:
        if incoming.snapshotter != current.snapshotter:
            raise InvalidArgument(f"container {q(current.id)}: snapshotter field is immutable")
        if incoming.runtime.name != current.runtime.name:
            raise InvalidArgument(f"container {q(current.id)}: runtime.name field is immutable")
        paths = UPDATABLE_ON_FULL_REPLACE
    for path in paths:
        if labels.apply_mask_path(updated.labels, incoming.labels, path):
            continue
        if path.startswith("extensions."):
            key = path[len("extensions.") :]
            if key in incoming.extensions:
                updated.extensions[key] = incoming.extensions[key]
            else:
                updated.extensions.pop(key, None)
        elif path == "extensions":
            updated.extensions = dict(incoming.extensions)
        elif path == "spec":
            updated.spec = incoming.spec
        elif path == "image":
            updated.image = incoming.image
        elif path == "snapshotkey":
            updated.snapshot_key = incoming.snapshot_key
        else:
            raise InvalidArgument(f"cannot update {q(path)} field on container {q(current.id)}")
    return updated


def _copy(container: Container) -> Container:
    """A copy its receiver may change without touching the cached record."""
    return replace(
        container,
        labels=dict(container.labels),
        extensions=dict(container.extensions),
        runtime=replace(container.runtime),
    )


class ContainerStore:
    def __init__(self, db: Database, events: Exchange) -> None:
        self._db = db
        self._events = events
        self._cache = db.row_cache("containers", ("namespace", "id"))

    async def get(self, namespace: str, container_id: str) -> Container:
        identifiers.validate(container_id, "container id")
        container = await self._db.read_cached(
            self._cache, (namespace, container_id), _get, namespace, container_id
        )
        return _copy(container)

    async def list(self, namespace: str, filter_exprs: Sequence[str] = ()) -> list[Container]:
        matcher = filters.parse_all(filter_exprs)

        def read(conn: sqlite3.Connection) -> list[Container]:
            rows = conn.execute("SELECT * FROM containers WHERE namespace = ? ORDER BY id", (namespace,))
            return [c for c in map(_row, rows) if matcher.match(adaptor(c))]

        return await self._db.read(read)

    async def create(self, namespace: str, container: Container) -> Container:
        validate(container)
        stamp = now_ns()
        created = replace(container, created_at=stamp, updated_at=stamp)

        def write(conn: sqlite3.Connection) -> None:
            namespaces.ensure(conn, namespace)
            try:
                _write_row(conn, namespace, created, insert=True)
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"container {q(container.id)}") from None
            self._db.cache_on_commit(self._cache, (namespace, created.id), _copy(created))

        await self._db.write(write)
        self._events.publish(
            namespace,
            "/containers/create",
            events_pb2.ContainerCreate(
                id=created.id,
                image=created.image,
                runtime=events_pb2.ContainerCreate.Runtime(
                    name=created.runtime.name,
                    options=_any_pb(created.runtime.options),
                ),
            ),
        )
        return created

    async def update(self, namespace: str, container: Container, paths: Sequence[str]) -> Container:
        identifiers.validate(container.id, "container id")
        labels.validate(container.labels, f"container {q(container.id)}")

        def write(conn: sqlite3.Connection) -> Container:
            current = _get(conn, namespace, container.id)
            updated = _merge(current, container, paths)
            updated.updated_at = now_ns()
            validate(updated)
            _write_row(conn, namespace, updated, insert=False)
            self._db.cache_on_commit(self._cache, (namespace, updated.id), _copy(updated))
            return updated

        updated = await self._db.write(write)
        self._events.publish(
            namespace,
            "/containers/update",
            events_pb2.ContainerUpdate(
                id=updated.id, image=updated.image, labels=updated.labels, snapshot_key=updated.snapshot_key
            ),
        )
        return updated

    async def delete(self, namespace: str, container_id: str) -> None:
        identifiers.validate(container_id, "container id")

        def write(conn: sqlite3.Connection) -> None:
            cursor = conn.execute(
                "DELETE FROM containers WHERE namespace = ? AND id = ?", (namespace, container_id)
            )
            if cursor.rowcount == 0:
                raise NotFound(f"container {q(container_id)}")

        await self._db.write(write)
        self._events.publish(namespace, "/containers/delete", events_pb2.ContainerDelete(id=container_id))


def _any_pb(value: AnyValue | None) -> any_pb2.Any | None:
    return None if value is None else any_pb2.Any(type_url=value.type_url, value=value.value)
