"""The garbage collector: mark and sweep over every namespace's content, snapshots, leases, ingests.

One collection, in order:

1. Read the namespaces, the ingests on disk and every loaded snapshotter's snapshots.
2. In ONE metadata write transaction: read images, containers, leases (+ resources) and content
   records, mark from the roots (runtimed.gc.graph has the rules), delete the expired leases and
   the unmarked content records, commit.
3. In a second metadata write transaction: remove the blob files no namespace records any more
   (ContentStore's own check-and-unlink) and, in the first collection of the process, orphan
   blob files a crash left without any record.
4. Snapshots unmarked in step 2 are marked again from a fresh read of the snapshotters and the
   metadata; those still unmarked are removed, children first, through each snapshotter.
5. Ingests unmarked in step 2 are aborted unless written to since (or locked by a writer).

Guarantees. Every metadata writer (images, containers, leases, content records) runs on the
metadata database's single thread, so step 2 is atomic with respect to all of them: a content
record is removed only if, at that instant, nothing in the metadata database reached it
(snapshot labels and parents are as step 1 read them); a reference committed after it
finds the record gone, exactly as if the collection had run first. Blob files go only after the
record deletion has committed (step 3), so a crash can leave an orphan file (reclaimed by the
first collection after the restart, which runs before the daemon serves) but never a record
without its blob.

Snapshots live in the snapshotters' own databases, which no metadata transaction covers. A
snapshot created after step 1 is never a candidate. A candidate is removed only if it is still
unreached in a second mark over fresh data (step 4), and the snapshotter's remove refuses a
snapshot that has a child by then, so a Prepare on it always wins. What remains are two narrow
windows: between that second mark and the snapshotter's delete (one await), a client could make
a new reference to a snapshot that nothing held; between step 1 and step 2, a snapshot created
or relabelled to name a blob that nothing else held does not keep it. The lease contract closes
both, as in containerd: clients (and the daemon's own pull, import and unpack) create and
reference snapshots and content under a lease, and the Snapshots service adds each snapshot it
prepares or commits under the call's lease before creating it, so a leased object is a root in
every mark that could see it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from google.protobuf.message import Message

from plugins.snapshotters.base import Snapshotter
from runtimed import digests
from runtimed.api.containerd.events import content_pb2, snapshot_pb2
from runtimed.content import ContentStore, ingest
from runtimed.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from runtimed.events.exchange import Envelope, Exchange
from runtimed.gc import graph
from runtimed.gc.graph import Garbage, Holder, IngestRecord, LeaseRecord, Node, Resources, SnapshotRecord
from runtimed.metadata.db import Database

log = structlog.get_logger("runtimed.gc")

# Events this collector published, remembered so the scheduler does not take them for new
# deletions; bounded in case nobody claims them.
MAX_OWN_EVENTS = 10_000


@dataclass
class Stats:
    """What one collection removed, and how long it took."""

    content: int = 0  # namespace records of blobs
    blobs: int = 0  # blob files
    snapshots: int = 0
    leases: int = 0  # expired
    ingests: int = 0  # stale, aborted
    pause: float = 0.0  # seconds the metadata database was held by the collection
    duration: float = 0.0  # seconds, the whole collection

    def fields(self) -> dict[str, Any]:
        return {
            "content": self.content,
            "blobs": self.blobs,
            "snapshots": self.snapshots,
            "leases": self.leases,
            "ingests": self.ingests,
            "pause_ms": round(self.pause * 1000, 2),
            "duration_ms": round(self.duration * 1000, 2),
        }


def _namespaces(conn: sqlite3.Connection) -> list[str]:
    return [row["name"] for row in conn.execute("SELECT name FROM namespaces ORDER BY name")]


def load_metadata(conn: sqlite3.Connection, resources: Resources) -> None:
    """Add the metadata database's part of the graph to `resources` (inside the caller's txn)."""
    for row in conn.execute("SELECT namespace, id, labels FROM leases"):
        resources.leases[Node.lease(row["namespace"], row["id"])] = LeaseRecord(json.loads(row["labels"]))
    for row in conn.execute("SELECT namespace, lease_id, resource_type, resource_id FROM lease_resources"):
        lease = resources.leases.get(Node.lease(row["namespace"], row["lease_id"]))
        if lease is not None:
            lease.resources.append((row["resource_type"], row["resource_id"]))
    for row in conn.execute("SELECT namespace, target_digest, labels FROM images"):
        namespace = row["namespace"]
        target = (Node.content(namespace, row["target_digest"]),)
        resources.holders.append(Holder(namespace, target, json.loads(row["labels"])))
    for row in conn.execute("SELECT namespace, snapshotter, snapshot_key, labels FROM containers"):
        namespace, snapshotter, key = row["namespace"], row["snapshotter"], row["snapshot_key"]
        snapshot = (Node.snapshot(namespace, snapshotter, key),) if snapshotter and key else ()
        resources.holders.append(Holder(namespace, snapshot, json.loads(row["labels"])))
    for row in conn.execute("SELECT namespace, digest, labels FROM content"):
        resources.content[Node.content(row["namespace"], row["digest"])] = json.loads(row["labels"])


def _within(found: Garbage, namespaces: Collection[str]) -> Garbage:
    # A namespace that appeared after step 1 has snapshots this collection never read, whose
    # labels may reference its content: leave all of it to the next collection.
    def keep(nodes: list[Node]) -> list[Node]:
        return [node for node in nodes if node.namespace in namespaces]

    return Garbage(keep(found.content), keep(found.snapshots), keep(found.ingests), keep(found.leases))


class Collector:
    def __init__(
        self,
        db: Database,
        content: ContentStore,
        snapshotters: Mapping[str, Snapshotter],
        events: Exchange,
        *,
        ingest_expiry_ns: int = graph.INGEST_EXPIRY_NS,
    ) -> None:
        self._db = db
        self._content = content
        self._snapshotters = dict(snapshotters)
        self._events = events
        self._ingest_expiry_ns = ingest_expiry_ns
        self._lock = asyncio.Lock()  # one collection at a time
        # Orphan blob files only come from a crash (a commit between rename and row, a delete
        # between row and unlink): look for them once per process, at the first collection.
        self._orphans_checked = False
        self._own_events: set[Envelope] = set()

    def claim(self, envelope: Envelope) -> bool:
        """Whether `envelope` is an event this collector published (forgotten once claimed)."""
        if envelope in self._own_events:
            self._own_events.discard(envelope)
            return True
        return False

    def _publish(self, namespace: str, topic: str, event: Message) -> None:
        if len(self._own_events) >= MAX_OWN_EVENTS:
            self._own_events.clear()
        self._own_events.add(self._events.publish(namespace, topic, event))

    async def collect(self) -> Stats:
        """Run one full collection; returns what it removed."""
        async with self._lock:
            started = time.perf_counter()
            now = time.time_ns()
            # Unleased ingests do not create their namespace's record: find those namespaces too.
            namespaces = sorted(set(await self._db.read(_namespaces)) | await self._ingest_namespaces())
            ingests = await self._load_ingests(namespaces)
            snapshots = await self._load_snapshots(namespaces)
            found, pause = await self._db.write(self._sweep_metadata, namespaces, snapshots, ingests, now)
            stats = Stats(content=len(found.content), leases=len(found.leases), pause=pause)

            stats.blobs, pause = await self._db.write(self._collect_blobs, [n.key for n in found.content])
            stats.pause += pause
            for node in found.content:
                self._publish(node.namespace, "/content/delete", content_pb2.ContentDelete(digest=node.key))
            for node in found.leases:
                log.info("expired lease removed", namespace=node.namespace, lease=node.key)

            if found.snapshots:
                stats.snapshots, pause = await self._sweep_snapshots(found.snapshots, namespaces, ingests)
                stats.pause += pause
            if found.ingests:
                stats.ingests = await self._sweep_ingests(found.ingests)
            stats.duration = time.perf_counter() - started
        log.info("garbage collected", **stats.fields())
        return stats

    # -- step 1: what lives outside the metadata database

    async def _ingest_namespaces(self) -> set[str]:
        root = self._content.root / "ingest"  # ContentStore's layout: ingest/<key>/status.json

        def scan() -> set[str]:
            try:
                entries = list(os.scandir(root))
            except FileNotFoundError:
                return set()
            records = (ingest.load_record(Path(e.path)) for e in entries if e.is_dir(follow_symlinks=False))
            return {record.namespace for record in records if record is not None}

        return await asyncio.to_thread(scan)

    async def _load_ingests(self, namespaces: Sequence[str]) -> dict[Node, IngestRecord]:
        ingests: dict[Node, IngestRecord] = {}
        for namespace in namespaces:
            for status in await self._content.list_statuses(namespace):
                touched = status.updated_at or status.started_at
                ingests[Node.ingest(namespace, status.ref)] = IngestRecord(status.expected, touched)
        return ingests

    async def _load_snapshots(self, namespaces: Sequence[str]) -> dict[Node, SnapshotRecord]:
        # A snapshotter that cannot be read fails the collection: marking without its labels
        # could sweep content they reference.
        snapshots: dict[Node, SnapshotRecord] = {}
        for name, snapshotter in self._snapshotters.items():
            for namespace in namespaces:
                async for info in snapshotter.walk(namespace):
                    node = Node.snapshot(namespace, name, info.name)
                    snapshots[node] = SnapshotRecord(info.parent, dict(info.labels))
        return snapshots

    # -- step 2: mark, and sweep the metadata, in one transaction

    def _sweep_metadata(
        self,
        conn: sqlite3.Connection,
        namespaces: Sequence[str],
        snapshots: dict[Node, SnapshotRecord],
        ingests: dict[Node, IngestRecord],
        now: int,
    ) -> tuple[Garbage, float]:
        started = time.perf_counter()
        resources = Resources(snapshots=snapshots, ingests=ingests)
        load_metadata(conn, resources)
        marked = graph.mark(resources, now, self._ingest_expiry_ns)
        found = _within(graph.garbage(resources, marked), set(namespaces))
        # Deleting a lease cascades to its lease_resources rows.
        conn.executemany(
            "DELETE FROM leases WHERE namespace = ? AND id = ?", [(n.namespace, n.key) for n in found.leases]
        )
        conn.executemany(
            "DELETE FROM content WHERE namespace = ? AND digest = ?",
            [(n.namespace, n.key) for n in found.content],
        )
        return found, time.perf_counter() - started

    # -- step 3: blob files

    def _collect_blobs(self, conn: sqlite3.Connection, swept: Sequence[str]) -> tuple[int, float]:
        """Unlink blobs no record names: the swept ones, and orphans a crash left behind.

        A metadata transaction, like every commit's rename-and-insert: no blob can be adopted
        or committed between the check and the unlink.
        """
        started = time.perf_counter()
        # ContentStore's rule (check no namespace records the digest, then unlink), reused
        # rather than restated so both paths stay identical.
        collect = self._content._collect_blob
        removed = sum(1 for digest in sorted(set(swept)) if collect(conn, digest))
        if not self._orphans_checked:
            removed += self._collect_orphans(conn)
            self._orphans_checked = True
        return removed, time.perf_counter() - started

    def _collect_orphans(self, conn: sqlite3.Connection) -> int:
        removed = 0
        known = {row["digest"] for row in conn.execute("SELECT DISTINCT digest FROM content")}
        blobs = self._content.root / "blobs"  # ContentStore's layout: blobs/<algorithm>/<hex>
        try:
            algorithms = [entry for entry in os.scandir(blobs) if entry.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            algorithms = []
        for algorithm in algorithms:
            for entry in os.scandir(algorithm.path):
                digest = f"{algorithm.name}:{entry.name}"
                if digest in known:
                    continue
                try:
                    digests.validate(digest)
                except InvalidArgument:
                    continue  # not a blob the store wrote: leave it alone
                if self._content._collect_blob(conn, digest):
                    log.info("orphan blob removed", digest=digest)
                    removed += 1
        return removed

    # -- step 4: snapshots

    def _remark(
        self,
        conn: sqlite3.Connection,
        snapshots: dict[Node, SnapshotRecord],
        ingests: dict[Node, IngestRecord],
        now: int,
    ) -> tuple[set[Node], float]:
        started = time.perf_counter()
        resources = Resources(snapshots=snapshots, ingests=ingests)
        load_metadata(conn, resources)
        return graph.mark(resources, now, self._ingest_expiry_ns), time.perf_counter() - started

    async def _sweep_snapshots(
        self, candidates: Sequence[Node], namespaces: Sequence[str], ingests: dict[Node, IngestRecord]
    ) -> tuple[int, float]:
        fresh = await self._load_snapshots(namespaces)
        marked, pause = await self._db.read(self._remark, fresh, ingests, time.time_ns())
        doomed = [node for node in candidates if node in fresh and node not in marked]
        removed = 0
        for node in graph.removal_order(doomed, fresh):
            snapshotter = self._snapshotters[node.snapshotter]
            try:
                await snapshotter.remove(node.namespace, node.key)
            except NotFound:
                continue  # removed by someone else meanwhile
            except FailedPrecondition as exc:
                # It got a child since the mark (a Prepare on it won the race): it stays.
                log.debug("snapshot kept", namespace=node.namespace, key=node.key, reason=str(exc))
                continue
            log.debug(
                "snapshot removed", namespace=node.namespace, snapshotter=node.snapshotter, key=node.key
            )
            self._publish(
                node.namespace,
                "/snapshot/remove",
                snapshot_pb2.SnapshotRemove(key=node.key, snapshotter=node.snapshotter),
            )
            removed += 1
        return removed, pause

    # -- step 5: ingests

    async def _sweep_ingests(self, candidates: Sequence[Node]) -> int:
        removed = 0
        for node in candidates:
            try:
                status = await self._content.status(node.namespace, node.key)
            except NotFound:
                continue
            if time.time_ns() - (status.updated_at or status.started_at) < self._ingest_expiry_ns:
                continue  # written to since the mark
            try:
                # Takes the ref's lock: an ingest a writer holds is Unavailable and stays.
                await self._content.abort(node.namespace, node.key)
            except (NotFound, Unavailable):
                continue
            log.info("stale ingest aborted", namespace=node.namespace, ref=node.key)
            removed += 1
        return removed
