"""The build cache: which filesystem step, applied to which state, made which layer.

A step's key is a chain: sha256 of the previous step's key, the instruction after variable
substitution, and for COPY/ADD the digest of the files copied (runtimed.build.context). The first
key is the base image's manifest digest and the snapshotter (or "scratch", or an earlier stage's
key). Config-only steps (ENV, CMD, LABEL, ...) extend the chain but need no record: they are
replayed, which is free.

Where records live, and why: each record is a small JSON blob in the content store, labelled
  runtimed.build/cache=<key>                                 -> found with one Content.List filter
  containerd.io/gc.root=<time>                               -> the record itself is a GC root
  containerd.io/gc.ref.content.layer=<layer blob digest>     -> keeps the layer blob
  containerd.io/gc.ref.snapshot.<snapshotter>=<chainID>      -> keeps the committed snapshot
                                                                (and, through parents, its chain)
so the garbage collector keeps exactly what a cache hit needs by containerd's own rules, with no
state outside the daemon, per namespace, visible with `ctr content ls`. Labels on the committed
snapshots alone would also keep them, but a layer blob is needed too (an image built from cache
must be pushable), and a snapshot label cannot be looked up by key without listing every snapshot.
A record whose snapshot or blob has gone (someone removed it) is a miss. The record keeps the
step's creation time, so a fully cached rebuild makes a byte-identical image (same digest).
`runtimectl build prune` deletes the records; the next collection takes whatever no image uses.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from runtimed.build.api import Daemon
from runtimed.types import Descriptor

CACHE_LABEL = "runtimed.build/cache"
RECORD_MEDIA_TYPE = "application/vnd.runtimed.build.cache.v1+json"
GC_ROOT = "containerd.io/gc.root"
GC_LAYER = "containerd.io/gc.ref.content.layer"
GC_SNAPSHOT = "containerd.io/gc.ref.snapshot."


def step_key(parent: str, *parts: str) -> str:
    digest = hashlib.sha256(parent.encode())
    for part in parts:
        digest.update(b"\0" + part.encode(errors="surrogateescape"))
    return digest.hexdigest()


def now() -> str:
    stamp = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp)) + f".{int(stamp % 1 * 1e9):09d}Z"


@dataclass
class Record:
    key: str
    created: str
    snapshotter: str
    layer: dict[str, Any] | None = None  # mediaType, digest, size: None for a step that changed nothing
    diff_id: str = ""
    chain_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def descriptor(self) -> Descriptor | None:
        if self.layer is None:
            return None
        return Descriptor(self.layer["mediaType"], self.layer["digest"], int(self.layer["size"]))


class BuildCache:
    def __init__(self, daemon: Daemon, snapshotter: str) -> None:
        self.daemon = daemon
        self.snapshotter = snapshotter

    def _records(self, key: str = "") -> list[tuple[Any, Record]]:
        selector = f'labels."{CACHE_LABEL}"' + (f"=={key}" if key else "")
        found = []
        for info in self.daemon.list_content([selector]):
            try:
                record = Record(**json.loads(self.daemon.read(info.digest)))
            except (ValueError, TypeError):
                continue
            found.append((info, record))
        return found

    def lookup(self, key: str) -> Record | None:
        records = sorted(self._records(key), key=lambda pair: pair[1].created, reverse=True)
        for _, record in records:
            if record.snapshotter != self.snapshotter:
                continue
            if record.layer is None:
                return record
            if self.daemon.info(record.layer["digest"]) is None:
                continue
            if not self.daemon.snapshot_exists(self.snapshotter, record.chain_id):
                continue
            return record
        return None

    def store(self, record: Record) -> None:
        data = json.dumps(asdict(record), sort_keys=True, separators=(",", ":")).encode()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        labels = {CACHE_LABEL: record.key, GC_ROOT: record.created}
        if record.layer is not None:
            labels[GC_LAYER] = record.layer["digest"]
            labels[GC_SNAPSHOT + record.snapshotter] = record.chain_id
        older = [info.digest for info, _ in self._records(record.key) if info.digest != digest]
        self.daemon.write(data, digest, labels)
        for stale in older:  # --no-cache replaced them
            self.daemon.delete_content(stale)

    def prune(self) -> int:
        records = self._records()
        for info, _ in records:
            self.daemon.delete_content(info.digest)
        return len(records)

    def chains(self) -> set[str]:
        """The snapshots the records keep (tests compare snapshot lists without them)."""
        return {record.chain_id for _, record in self._records() if record.chain_id}
