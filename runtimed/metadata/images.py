"""Images: a name in a namespace pointing at a target descriptor (stored as given)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import replace

from runtimed import digests, filters, labels
from runtimed.api.containerd.events import image_pb2 as events_pb2
from runtimed.errors import AlreadyExists, InvalidArgument, NotFound, q
from runtimed.events.exchange import Exchange
from runtimed.metadata import namespaces
from runtimed.metadata.db import Database
from runtimed.types import Descriptor, Image, now_ns

MAX_NAME_LENGTH = 4096


def validate_name(name: str) -> str:
    if not name:
        raise InvalidArgument("image name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"image name greater than maximum length ({MAX_NAME_LENGTH} characters)")
    if any(ch.isspace() or not ch.isprintable() for ch in name):
        raise InvalidArgument(f"image name {q(name)} must not contain whitespace or control characters")
    return name


def validate(image: Image) -> None:
    validate_name(image.name)
    labels.validate(image.labels, f"image {q(image.name)}")
    target = image.target
    digests.validate(target.digest, f"image {q(image.name)}: target.digest")
    if target.size <= 0:
        raise InvalidArgument(f"image {q(image.name)}: target.size must be greater than zero")
    if not target.media_type:
        raise InvalidArgument(f"image {q(image.name)}: target.media_type must be set")


def _row(row: sqlite3.Row) -> Image:
    return Image(
        name=row["name"],
        labels=json.loads(row["labels"]),
        target=Descriptor(
            media_type=row["target_media_type"],
            digest=row["target_digest"],
            size=row["target_size"],
            annotations=json.loads(row["target_annotations"]),
        ),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def adaptor(image: Image) -> filters.Adaptor:
    return filters.adaptor_for(
        {
            "name": image.name,
            "target.digest": image.target.digest,
            "target.mediatype": image.target.media_type,
        },
        image.labels,
    )


def _get(conn: sqlite3.Connection, namespace: str, name: str) -> Image:
    row = conn.execute("SELECT * FROM images WHERE namespace = ? AND name = ?", (namespace, name)).fetchone()
    if row is None:
        raise NotFound(f"image {q(name)}")
    return _row(row)


def _save(conn: sqlite3.Connection, namespace: str, image: Image, *, insert: bool) -> None:
    values = (
        json.dumps(image.labels),
        image.target.media_type,
        image.target.digest,
        image.target.size,
        json.dumps(image.target.annotations),
        image.created_at,
        image.updated_at,
        namespace,
        image.name,
    )
    if insert:
        conn.execute(
            "INSERT INTO images(labels, target_media_type, target_digest, target_size, target_annotations,"
            " created_at, updated_at, namespace, name) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            values,
        )
    else:
        conn.execute(
            "UPDATE images SET labels = ?, target_media_type = ?, target_digest = ?, target_size = ?,"
            " target_annotations = ?, created_at = ?, updated_at = ? WHERE namespace = ? AND name = ?",
            values,
        )


def _merge(current: Image, incoming: Image, paths: Sequence[str]) -> Image:
    updated = replace(current, labels=dict(current.labels))
    for path in paths or ("labels", "target"):
        if labels.apply_mask_path(updated.labels, incoming.labels, path):
            continue
        if path == "target":
            updated.target = incoming.target
        elif path == "annotations":
            updated.target = replace(updated.target, annotations=dict(incoming.target.annotations))
        else:
            raise InvalidArgument(f"cannot update {q(path)} field on image {q(current.name)}")
    return updated


class ImageStore:
    def __init__(self, db: Database, events: Exchange) -> None:
        self._db = db
        self._events = events
        self._cache = db.row_cache("images", ("namespace", "name"))

    async def get(self, namespace: str, name: str) -> Image:
        validate_name(name)
        image = await self._db.read_cached(self._cache, (namespace, name), _get, namespace, name)
        # A copy its receiver may change without touching the cached record.
        return replace(
            image,
            labels=dict(image.labels),
            target=replace(image.target, annotations=dict(image.target.annotations)),
        )

    async def list(self, namespace: str, filter_exprs: Sequence[str] = ()) -> list[Image]:
        matcher = filters.parse_all(filter_exprs)

        def read(conn: sqlite3.Connection) -> list[Image]:
            rows = conn.execute("SELECT * FROM images WHERE namespace = ? ORDER BY name", (namespace,))
            return [i for i in map(_row, rows) if matcher.match(adaptor(i))]

        return await self._db.read(read)

    async def create(self, namespace: str, image: Image) -> Image:
        validate(image)
        stamp = now_ns()
        created = replace(image, created_at=stamp, updated_at=stamp)

        def write(conn: sqlite3.Connection) -> None:
            namespaces.ensure(conn, namespace)
            try:
                _save(conn, namespace, created, insert=True)
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"image {q(image.name)}") from None

        await self._db.write(write)
        self._events.publish(
            namespace, "/images/create", events_pb2.ImageCreate(name=created.name, labels=created.labels)
        )
        return created

    async def update(self, namespace: str, image: Image, paths: Sequence[str]) -> Image:
        validate_name(image.name)
        labels.validate(image.labels, f"image {q(image.name)}")

        def write(conn: sqlite3.Connection) -> Image:
            updated = _merge(_get(conn, namespace, image.name), image, paths)
            updated.updated_at = now_ns()
            validate(updated)
            _save(conn, namespace, updated, insert=False)
            return updated

        updated = await self._db.write(write)
        self._events.publish(
            namespace, "/images/update", events_pb2.ImageUpdate(name=updated.name, labels=updated.labels)
        )
        return updated

    async def delete(self, namespace: str, name: str) -> None:
        validate_name(name)

        def write(conn: sqlite3.Connection) -> None:
            cursor = conn.execute("DELETE FROM images WHERE namespace = ? AND name = ?", (namespace, name))
            if cursor.rowcount == 0:
                raise NotFound(f"image {q(name)}")

        await self._db.write(write)
        self._events.publish(namespace, "/images/delete", events_pb2.ImageDelete(name=name))
