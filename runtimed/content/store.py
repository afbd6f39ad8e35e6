"""The content store: blobs shared on disk, visible per namespace through the metadata database.

Layout under the plugin root:

    blobs/sha256/<hex>                      verified blobs, written once, read-only, shared by
                                            every namespace
    ingest/<sha256 of "namespace/ref">/     one write in progress: `data` + `status.json`

A namespace sees a blob only through its row in the `content` table (digest, size, labels,
timestamps). A blob becomes visible when a commit has verified its size and digest: the data is
fsynced, renamed into blobs/ and the row inserted inside one metadata transaction. Because every
metadata transaction runs on the database's single thread, that rename-and-insert is serialised
with a delete's check-and-unlink: a blob file is never removed under a namespace that just
adopted it. A crash can leave a blob file without any row (invisible, collected by GC later),
never a row without its blob.

The semantics follow containerd 1.6 (metadata/content.go, content/local): one writer per
(namespace, ref) at a time, resumable ingests, AlreadyExists for content the namespace has, and
adoption without re-upload of a blob another namespace has when the writer names its digest.

File I/O and hashing run in worker threads; the event loop only does bookkeeping.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from runtimed import digests, filters
from runtimed import labels as label_rules
from runtimed.api.containerd.events import content_pb2 as events_pb2
from runtimed.content import ingest
from runtimed.content.ingest import IngestFile
from runtimed.content.types import ContentInfo, IngestStatus
from runtimed.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
    q,
)
from runtimed.events.exchange import Exchange
from runtimed.metadata import namespaces
from runtimed.metadata.db import Database
from runtimed.storage import fsync_dir
from runtimed.types import now_ns

log = structlog.get_logger("runtimed.content")

CHUNK = ingest.CHUNK
MAX_REF_LENGTH = 4096
# Lease resource types, as containerd names them.
CONTENT_RESOURCE = "content"
INGEST_RESOURCE = "ingests"

_EXISTS = "exists"

# Blobs this small (manifests, indexes, configs: what clients read again and again) are kept in
# memory once read, up to SMALL_BLOB_CACHE bytes in all, least recently used first out. A blob
# never changes under its digest, and one is served only to a namespace whose record of it the
# metadata database (or its row cache) shows, exactly as a read from disk would be.
SMALL_BLOB = 64 * 1024
SMALL_BLOB_CACHE = 8 * 1024 * 1024


def _row(row: sqlite3.Row) -> ContentInfo:
    return ContentInfo(
        digest=row["digest"],
        size=row["size"],
        labels=json.loads(row["labels"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def adaptor(info: ContentInfo) -> filters.Adaptor:
    # containerd exposes digest (always present) and labels; size is never present.
    return filters.adaptor_for({"digest": info.digest}, info.labels)


def status_adaptor(status: IngestStatus) -> filters.Adaptor:
    return filters.adaptor_for({"ref": status.ref, "expected": status.expected}, always_present=("ref",))


def _validate_ref(ref: str) -> str:
    if not ref:
        raise InvalidArgument("ref must not be empty")
    if len(ref) > MAX_REF_LENGTH:
        raise InvalidArgument(f"ref {q(ref[:64])}... greater than maximum length ({MAX_REF_LENGTH})")
    return ref


def _get(conn: sqlite3.Connection, namespace: str, digest: str) -> ContentInfo:
    row = conn.execute(
        "SELECT * FROM content WHERE namespace = ? AND digest = ?", (namespace, digest)
    ).fetchone()
    if row is None:
        raise NotFound(f"content digest {digest}")
    return _row(row)


def _has(conn: sqlite3.Connection, namespace: str, digest: str) -> bool:
    query = "SELECT 1 FROM content WHERE namespace = ? AND digest = ?"
    return conn.execute(query, (namespace, digest)).fetchone() is not None


# Lease bookkeeping in the caller's transaction, on the leases/lease_resources tables that
# runtimed.metadata.leases.LeaseStore owns (same rows, same meaning).


def _require_lease(conn: sqlite3.Connection, namespace: str, lease: str) -> None:
    query = "SELECT 1 FROM leases WHERE namespace = ? AND id = ?"
    if conn.execute(query, (namespace, lease)).fetchone() is None:
        raise NotFound(f"lease {q(lease)} does not exist")


def _lease_add(conn: sqlite3.Connection, namespace: str, lease: str, kind: str, resource: str) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO lease_resources(namespace, lease_id, resource_type, resource_id)"
        " VALUES (?, ?, ?, ?)",
        (namespace, lease, kind, resource),
    )


def _drop_ingest_leases(conn: sqlite3.Connection, namespace: str, ref: str) -> None:
    # The ingest is gone: no lease of the namespace can still hold it.
    conn.execute(
        "DELETE FROM lease_resources WHERE namespace = ? AND resource_type = ? AND resource_id = ?",
        (namespace, INGEST_RESOURCE, ref),
    )


class ContentStore:
    def __init__(self, root: Path, db: Database, events: Exchange) -> None:
        self.root = root
        self._blobs = root / "blobs"
        self._ingests = root / "ingest"
        self._db = db
        self._events = events
        # Content records by (namespace, digest), kept coherent by the database (see RowCache).
        self._infos = db.row_cache("content", ("namespace", "digest"), max_entries=8192)
        # digest -> bytes of small blobs (event loop only).
        self._small: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._small_size = 0
        # (namespace, ref) -> when its lock was taken; one writer (or abort) at a time.
        self._locks: dict[tuple[str, str], float] = {}
        self._active: dict[tuple[str, str], Writer] = {}

    async def open(self) -> None:
        def prepare() -> int:
            for directory in (self._blobs / "sha256", self._ingests):
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            return ingest.sweep(self._ingests)

        removed = await asyncio.to_thread(prepare)
        if removed:
            log.info("removed leftovers of interrupted ingests", count=removed)

    async def close(self) -> None:
        for writer in list(self._active.values()):
            await writer.close()

    # -- paths and locks -------------------------------------------------------------------

    def blob_file(self, digest: str) -> Path:
        """Where a blob lives on disk, visible or not; callers check visibility first."""
        algorithm, encoded = digests.validate(digest).split(":", 1)
        return self._blobs / algorithm / encoded

    def _ingest_dir(self, namespace: str, ref: str) -> Path:
        return self._ingests / ingest.ingest_key(namespace, ref)

    def _acquire(self, namespace: str, ref: str) -> None:
        since = self._locks.get((namespace, ref))
        if since is not None:
            held = time.time() - since
            when = datetime.fromtimestamp(since, UTC).isoformat()
            raise Unavailable(f"ref {ref} locked for {held:.3f}s (since {when})")
        self._locks[(namespace, ref)] = time.time()

    def _release(self, namespace: str, ref: str) -> None:
        self._locks.pop((namespace, ref), None)
        self._active.pop((namespace, ref), None)

    # -- blobs -----------------------------------------------------------------------------

    async def info(self, namespace: str, digest: str) -> ContentInfo:
        digests.validate(digest)
        info = await self._db.read_cached(self._infos, (namespace, digest), _get, namespace, digest)
        return replace(info, labels=dict(info.labels))  # the cached record stays as read

    async def exists(self, namespace: str, digest: str) -> bool:
        digests.validate(digest)
        return await self._db.read(_has, namespace, digest)

    async def update(self, namespace: str, info: ContentInfo, paths: Sequence[str] = ()) -> ContentInfo:
        """Update labels by field mask: `labels`, `labels.<key>`; an empty mask replaces the labels."""
        digest = digests.validate(info.digest)
        label_rules.validate(info.labels, f"content {digest}")

        def write(conn: sqlite3.Connection) -> ContentInfo:
            current = _get(conn, namespace, digest)
            for path in paths or ["labels"]:
                if not label_rules.apply_mask_path(current.labels, info.labels, path):
                    raise InvalidArgument(f"cannot update {q(path)} field on content info {q(digest)}")
            label_rules.validate(current.labels, f"content {digest}")
            current.updated_at = now_ns()
            conn.execute(
                "UPDATE content SET labels = ?, updated_at = ? WHERE namespace = ? AND digest = ?",
                (json.dumps(current.labels), current.updated_at, namespace, digest),
            )
            return current

        return await self._db.write(write)

    async def list(self, namespace: str, filter_exprs: Sequence[str] = ()) -> list[ContentInfo]:
        matcher = filters.parse_all(filter_exprs)

        def read(conn: sqlite3.Connection) -> list[ContentInfo]:
            rows = conn.execute("SELECT * FROM content WHERE namespace = ? ORDER BY digest", (namespace,))
            return [info for info in map(_row, rows) if matcher.match(adaptor(info))]

        return await self._db.read(read)

    async def delete(self, namespace: str, digest: str, *, lease: str = "") -> None:
        """Remove the blob from the namespace; its file goes when no namespace has it any more."""
        digests.validate(digest)

        def forget(conn: sqlite3.Connection) -> None:
            query = "DELETE FROM content WHERE namespace = ? AND digest = ?"
            if conn.execute(query, (namespace, digest)).rowcount == 0:
                raise NotFound(f"content digest {digest}")
            if lease:
                conn.execute(
                    "DELETE FROM lease_resources WHERE namespace = ? AND lease_id = ? AND resource_type = ?"
                    " AND resource_id = ?",
                    (namespace, lease, CONTENT_RESOURCE, digest),
                )

        await self._db.write(forget)
        # A second transaction, on the same serial database thread as every commit: the check
        # and the unlink cannot interleave with another namespace adopting the blob.
        removed = await self._db.write(self._collect_blob, digest)
        if removed:
            self._forget_small_blob(digest)
        log.info("content deleted", namespace=namespace, digest=digest, blob_removed=removed)
        self._events.publish(namespace, "/content/delete", events_pb2.ContentDelete(digest=digest))

    def _collect_blob(self, conn: sqlite3.Connection, digest: str) -> bool:
        if conn.execute("SELECT 1 FROM content WHERE digest = ? LIMIT 1", (digest,)).fetchone():
            return False
        try:
            self.blob_file(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    async def blob_path(self, namespace: str, digest: str) -> Path:
        """The blob's file, once the namespace is known to see it (read it in a thread)."""
        await self.info(namespace, digest)
        return self.blob_file(digest)

    async def read(self, namespace: str, digest: str, offset: int = 0, size: int = 0) -> AsyncIterator[bytes]:
        """The bytes [offset, offset+size) of a blob (size 0: to the end), in chunks of <= 1 MiB."""
        info = await self.info(namespace, digest)
        offset = max(offset, 0)
        if offset > info.size:
            raise OutOfRange(f"read past object length {info.size} bytes")
        end = info.size if size <= 0 or offset + size > info.size else offset + size
        if info.size <= SMALL_BLOB:
            if end > offset:
                data = await self._small_blob(digest, info.size)
                yield data[offset:end] if offset or end < len(data) else data
            return
        if end - offset <= CHUNK:
            # One chunk or less (manifests, configs, indexes): open, read and close in one hop.
            if end > offset:
                yield await asyncio.to_thread(self._read_range, digest, offset, end, info.size)
            return
        try:
            fd = await asyncio.to_thread(os.open, self.blob_file(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"content digest {digest}") from None
        try:
            position = offset
            while position < end:
                chunk = await asyncio.to_thread(os.pread, fd, min(CHUNK, end - position), position)
                if not chunk:
                    raise Internal(f"content {digest} is shorter on disk than its recorded size {info.size}")
                position += len(chunk)
                yield chunk
        finally:
            os.close(fd)

    async def _small_blob(self, digest: str, size: int) -> bytes:
        """A small blob's bytes, from memory or read whole (and kept) in one worker-thread hop."""
        data = self._small.get(digest)
        if data is not None and len(data) == size:
            self._small.move_to_end(digest)
            return data
        data = await asyncio.to_thread(self._read_range, digest, 0, size, size)
        if digest not in self._small:
            self._small[digest] = data
            self._small_size += len(data)
            while self._small_size > SMALL_BLOB_CACHE:
                _, dropped = self._small.popitem(last=False)
                self._small_size -= len(dropped)
        return data

    def _forget_small_blob(self, digest: str) -> None:
        data = self._small.pop(digest, None)
        if data is not None:
            self._small_size -= len(data)

    def _read_range(self, digest: str, offset: int, end: int, size: int) -> bytes:
        """The bytes [offset, end) of a blob, in a worker thread."""
        try:
            fd = os.open(self.blob_file(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"content digest {digest}") from None
        try:
            parts = []
            position = offset
            while position < end:
                chunk = os.pread(fd, end - position, position)
                if not chunk:
                    raise Internal(f"content {digest} is shorter on disk than its recorded size {size}")
                parts.append(chunk)
                position += len(chunk)
            return parts[0] if len(parts) == 1 else b"".join(parts)  # one part, almost always
        finally:
            os.close(fd)

    # -- ingests ---------------------------------------------------------------------------

    def writer(
        self, namespace: str, ref: str, total: int = 0, expected: str = "", *, lease: str = ""
    ) -> Writer:
        """A writer for `ref`, opened by `async with` (which takes the ref's lock).

        Opening raises AlreadyExists when `expected` is already in the namespace, and
        Unavailable while another writer holds the ref.
        """
        return Writer(self, namespace, ref, total, expected, lease)

    async def status(self, namespace: str, ref: str) -> IngestStatus:
        writer = self._active.get((namespace, ref))
        if writer is not None and writer.has_ingest:
            return writer.status()
        status = await asyncio.to_thread(ingest.read_status, self._ingest_dir(namespace, ref), namespace, ref)
        if status is None:
            raise NotFound(f"reference {ref}")
        return status

    async def list_statuses(self, namespace: str, filter_exprs: Sequence[str] = ()) -> list[IngestStatus]:
        matcher = filters.parse_all(filter_exprs)
        found = await asyncio.to_thread(lambda: list(ingest.scan(self._ingests, namespace)))
        by_ref = {status.ref: status for status in found}
        for (writer_namespace, ref), writer in list(self._active.items()):
            if writer_namespace == namespace and writer.has_ingest:
                by_ref[ref] = writer.status()  # fresher than the disk
        return [by_ref[ref] for ref in sorted(by_ref) if matcher.match(status_adaptor(by_ref[ref]))]

    async def abort(self, namespace: str, ref: str) -> None:
        """Drop an ingest that no writer holds (Unavailable while one does)."""
        self._acquire(namespace, ref)
        try:
            directory = self._ingest_dir(namespace, ref)
            status = await asyncio.to_thread(ingest.read_status, directory, namespace, ref)
            if status is None:
                raise NotFound(f"reference {ref}")
            await asyncio.to_thread(ingest.remove, directory)
            await self._db.write(_drop_ingest_leases, namespace, ref)
        finally:
            self._release(namespace, ref)
        log.info("ingest aborted", namespace=namespace, ref=ref)

    async def ingest_bytes(
        self,
        namespace: str,
        ref: str,
        data: bytes,
        expected: str = "",
        labels: Mapping[str, str] | None = None,
        *,
        lease: str = "",
    ) -> ContentInfo:
        """Store `data` in one go (manifests, configs); content already there is success.

        Labels apply only when the blob is new to the namespace (use update() otherwise).
        """
        if not expected:
            expected = await asyncio.to_thread(digests.sha256_of, data)
        try:
            async with self.writer(namespace, ref, total=len(data), expected=expected, lease=lease) as writer:
                status = writer.status()
                if not (status.offset == len(data) and writer.digest() == expected):
                    await writer.write(data, 0)
                await writer.commit(len(data), expected, labels)
        except AlreadyExists:
            pass
        return await self.info(namespace, expected)

    # -- transactions on the database thread -----------------------------------------------

    def _open_txn(
        self, conn: sqlite3.Connection, namespace: str, ref: str, expected: str, total: int, lease: str
    ) -> ContentInfo | str | None:
        """What a new writer is: _EXISTS, a blob to adopt (ContentInfo) or a fresh ingest (None)."""
        if lease:
            _require_lease(conn, namespace, lease)
        shared: ContentInfo | None = None
        if expected:
            if _has(conn, namespace, expected):
                if lease:
                    # Keeps the blob leased even though the write stops here (containerd too).
                    _lease_add(conn, namespace, lease, CONTENT_RESOURCE, expected)
                return _EXISTS
            row = conn.execute("SELECT size FROM content WHERE digest = ? LIMIT 1", (expected,)).fetchone()
            if row is not None and total in (0, row["size"]) and self.blob_file(expected).is_file():
                shared = ContentInfo(digest=expected, size=row["size"])
        if lease:
            _lease_add(conn, namespace, lease, INGEST_RESOURCE, ref)
        return shared

    def _commit_txn(
        self,
        conn: sqlite3.Connection,
        namespace: str,
        ref: str,
        digest: str,
        size: int,
        blob_labels: dict[str, str],
        source: Path | None,
        lease: str,
    ) -> bool:
        """Make a verified blob visible in the namespace; True if it already was."""
        if lease:
            _require_lease(conn, namespace, lease)
        _drop_ingest_leases(conn, namespace, ref)
        if lease:
            _lease_add(conn, namespace, lease, CONTENT_RESOURCE, digest)
        if _has(conn, namespace, digest):
            return True
        stamp = now_ns()
        namespaces.ensure(conn, namespace)
        conn.execute(
            "INSERT INTO content(namespace, digest, size, labels, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (namespace, digest, size, json.dumps(blob_labels), stamp, stamp),
        )
        target = self.blob_file(digest)
        if not target.is_file():
            if source is None:
                raise FailedPrecondition(f"content {digest} was removed while being adopted")
            # Last, so that any failure before it rolls back with nothing moved. The data
            # was fsynced by the writer; the rename is made durable before the row commits.
            os.rename(source, target)
            target.chmod(0o444)
            fsync_dir(target.parent)
        return False


class Writer:
    """One ingest held open under its ref: the Python face of Content.Write.

    Use as `async with store.writer(ns, ref, total, expected) as w:`; leaving the block
    releases the ref whatever happened, keeping an unfinished ingest for a later resume.
    """

    def __init__(
        self, store: ContentStore, namespace: str, ref: str, total: int, expected: str, lease: str
    ) -> None:
        self._store = store
        self.namespace = namespace
        self.ref = ref
        self._total = total
        self._expected = expected
        self._lease = lease
        self._file: IngestFile | None = None
        # A blob only another namespace has: nothing to upload, adopted at commit.
        self._shared: ContentInfo | None = None
        self._shared_since = 0
        self._state = "new"  # -> opening -> open -> done
        self._fresh = False  # whether opening created the ingest (it did not exist before)
        self._pending: asyncio.Future[Any] | None = None  # the last thread or database work
        self._op = asyncio.Lock()
        self._log = log.bind(namespace=namespace, ref=ref)

    async def __aenter__(self) -> Writer:
        await self.open()
        return self

    async def __aexit__(self, exc_type: Any, *exc_info: Any) -> None:
        if exc_type is not None and self._fresh and self._file is not None and self._file.offset == 0:
            # The call that created this ingest failed before writing a byte: nothing to
            # resume, so leave nothing behind (a failed first message must not leave debris).
            await self.abort()
            return
        await self.close()

    @property
    def has_ingest(self) -> bool:
        """Whether there is data on disk (not a pending adoption)."""
        return self._state == "open" and self._file is not None

    async def open(self) -> None:
        if self._state != "new":
            raise FailedPrecondition(f"writer for ref {self.ref} was already opened")
        _validate_ref(self.ref)
        if self._total < 0:
            raise InvalidArgument(f"total {self._total} must not be negative")
        if self._expected:
            digests.validate(self._expected, "expected digest")
        store = self._store
        store._acquire(self.namespace, self.ref)
        self._state = "opening"
        try:
            outcome: ContentInfo | str | None = None
            if self._lease or self._expected:
                args = (self.namespace, self.ref, self._expected, self._total, self._lease)
                run = store._db.write if self._lease else store._db.read
                outcome = await run(store._open_txn, *args)
            if outcome == _EXISTS:
                raise AlreadyExists(f"content {self._expected}")
            if isinstance(outcome, ContentInfo):
                self._shared, self._shared_since = outcome, now_ns()
                self._log.debug("writer adopts content of another namespace", digest=outcome.digest)
            else:
                directory = store._ingest_dir(self.namespace, self.ref)

                def start() -> None:
                    self._fresh = not directory.exists()
                    self._file = IngestFile.open(
                        directory, self.namespace, self.ref, self._total, self._expected, now_ns()
                    )

                await self._call(start)
        except BaseException:
            await self._finish(discard=False)
            raise
        self._state = "open"
        store._active[(self.namespace, self.ref)] = self

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Blocking work in a thread. A cancelled caller does not stop it: it finishes, and the
        ref stays locked until it has (see _wind_up), so no other writer races it on disk."""
        work = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        self._pending = work
        return await asyncio.shield(work)

    def _check_open(self) -> None:
        if self._state != "open":
            raise FailedPrecondition(f"writer for ref {self.ref} is not open")

    def status(self) -> IngestStatus:
        if self._shared is not None:
            size = self._shared.size
            return IngestStatus(
                ref=self.ref,
                offset=size,
                total=size,
                expected=self._shared.digest,
                started_at=self._shared_since,
                updated_at=self._shared_since,
            )
        if self._file is None:
            return IngestStatus(ref=self.ref, total=self._total, expected=self._expected)
        return self._file.record.status(self._file.offset)

    def digest(self) -> str:
        """The digest of the data so far (of the blob, when adopting one)."""
        if self._shared is not None:
            return self._shared.digest
        if self._file is None:
            return digests.sha256_of(b"")
        return self._file.digest()

    async def write(self, data: bytes, offset: int | None = None) -> int:
        """Append `data`; returns the new offset.

        With `offset` (Content.Write's rule): > 0 must equal the current offset (else
        OutOfRange); 0 while data exists truncates the ingest first.
        """
        async with self._op:
            self._check_open()
            current = self.status().offset
            if offset is not None and offset > 0 and offset != current:
                raise OutOfRange(f"write @{offset} must occur at current offset {current}")
            if offset == 0 and current > 0:
                if self._shared is not None:
                    await self._unshare(copy=False)
                elif self._file is not None:
                    await self._call(self._file.truncate)
                    self._file.record.updated_at = now_ns()
            if data:
                if self._shared is not None:
                    await self._unshare(copy=True)
                file = self._file
                assert file is not None
                try:
                    await self._call(file.write, data)
                except OSError as exc:
                    raise await self._disk_error(exc) from exc
                file.record.updated_at = now_ns()
            return self.status().offset

    async def _disk_error(self, exc: OSError) -> Exception:
        """The error to raise for a failed write of the ingest's data.

        A full disk (ENOSPC, EDQUOT) drops the ingest instead of keeping it for a resume: its
        partial data is what filled the disk, and keeping it would leave the disk full for
        everything else (a resume cannot finish before space is freed anyway).
        """
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return exc
        with contextlib.suppress(Exception):
            await self._finish(discard=True)
            await self._store._db.write(_drop_ingest_leases, self.namespace, self.ref)
        self._log.warning("ingest dropped: disk full", error=str(exc))
        return ResourceExhausted(f"writing content {q(self.ref)}: {os.strerror(exc.errno).lower()}")

    async def _unshare(self, *, copy: bool) -> None:
        """Turn a pending adoption into a real ingest (the client sent data after all)."""
        shared = self._shared
        assert shared is not None
        store = self._store
        source = store.blob_file(shared.digest)
        directory = store._ingest_dir(self.namespace, self.ref)

        def start() -> None:
            file = IngestFile.open(directory, self.namespace, self.ref, shared.size, shared.digest, now_ns())
            self._file, self._shared = file, None
            if file.offset:
                file.truncate()
            if copy:
                file.copy_from(source, shared.size)

        await self._call(start)

    async def commit(self, size: int = 0, expected: str = "", labels: Mapping[str, str] | None = None) -> str:
        """Verify size (if > 0) and digest (if given), make the blob visible; returns its digest.

        A digest mismatch is FailedPrecondition and removes the ingest; content the
        namespace already has is AlreadyExists (the ingest is dropped all the same).
        """
        blob_labels = _labels(labels)
        if expected:
            digests.validate(expected, "expected digest")
        async with self._op:
            self._check_open()
            source: Path | None = None
            if self._shared is not None:
                digest, actual_size = self._shared.digest, self._shared.size
                if size and size != actual_size:
                    raise FailedPrecondition(f"{q(self.ref)} failed size validation: {actual_size} != {size}")
                if expected and expected != digest:
                    raise FailedPrecondition(f"{q(self.ref)} unexpected digest {digest}, expected {expected}")
            else:
                file = self._file
                assert file is not None
                try:
                    actual_size = await self._call(file.sync)
                except OSError as exc:
                    raise await self._disk_error(exc) from exc
                if size and size != actual_size:
                    raise FailedPrecondition(f"{q(self.ref)} failed size validation: {actual_size} != {size}")
                digest = file.digest()
                if expected and expected != digest:
                    await self._finish(discard=True)
                    self._log.info("ingest discarded: digest mismatch", expected=expected, actual=digest)
                    raise FailedPrecondition(f"unexpected commit digest {digest}, expected {expected}")
                source = file.data_path
            store = self._store
            transaction = asyncio.ensure_future(
                store._db.write(
                    store._commit_txn,
                    self.namespace,
                    self.ref,
                    digest,
                    actual_size,
                    blob_labels,
                    source,
                    self._lease,
                )
            )
            self._pending = transaction
            try:
                existed = await asyncio.shield(transaction)
            finally:
                # Whatever happened, the data either moved into blobs/ or stays for a resume;
                # an ingest without data is removed when the writer winds up.
                if transaction.done() and not transaction.cancelled() and transaction.exception() is None:
                    await self._finish(discard=True)
        if existed:
            raise AlreadyExists(f"content {digest}")
        self._log.info("content committed", digest=digest, size=actual_size)
        return digest

    async def abort(self) -> None:
        """Drop the ingest and release the ref."""
        if self._state != "open":
            return
        await self._finish(discard=True)
        await self._store._db.write(_drop_ingest_leases, self.namespace, self.ref)
        self._log.info("ingest aborted")

    async def close(self) -> None:
        """Release the ref, keeping the ingest's data for a later resume."""
        if self._state == "open":
            await self._finish(discard=False)

    async def _finish(self, *, discard: bool) -> None:
        self._state = "done"
        # A task of its own, so that a cancelled caller cannot leave the ref locked forever
        # nor unlock it while a thread still works on the ingest.
        await asyncio.shield(asyncio.ensure_future(self._wind_up(discard)))

    async def _wind_up(self, discard: bool) -> None:
        try:
            pending = self._pending
            if pending is not None and not pending.done():
                with contextlib.suppress(Exception):
                    await pending
            file = self._file
            if file is not None:
                await asyncio.to_thread(file.discard if discard else functools.partial(file.close, now_ns()))
        except OSError as exc:
            self._log.warning("closing ingest failed", error=str(exc))
        finally:
            self._store._release(self.namespace, self.ref)


def _labels(values: Mapping[str, str] | None) -> dict[str, str]:
    return label_rules.validate(values or {}, "content labels")
