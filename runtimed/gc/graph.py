"""The collector's graph: what the roots reach, with containerd 1.6's rules (metadata/gc.go).

Pure functions over `Resources`, a snapshot of every namespace's objects, so the rules are
tested without a daemon. A reference never leaves its holder's namespace: namespace A's label
naming a digest keeps A's record of that blob, never B's.

Roots, per namespace:

* an image: its target's content, and the content/snapshots its gc.ref labels name;
* a container: its snapshot (snapshotter + snapshot_key) and its gc.ref labels; not its image
  (containerd does not keep a container's image either);
* a lease that has not expired (`containerd.io/gc.expire`, RFC3339, in the past = expired):
  every resource it holds (content, `snapshots/<snapshotter>`, ingests). With
  `containerd.io/gc.flat` the leased content and snapshots are kept without following their
  labels (a snapshot's parents are still kept: the snapshotter needs them);
* content and snapshots labelled `containerd.io/gc.root` (any value; not parsed as a time);
* an ingest held by a live lease, or written to within the ingest expiry (24 h, containerd's).

References:

* content and snapshot labels `containerd.io/gc.ref.content`, `...gc.ref.content.<name>` or
  `.../<name>` -> content; `containerd.io/gc.ref.snapshot.<snapshotter>[/<name>]` -> that
  snapshotter's snapshot (images and containers labels follow the same rules);
* a snapshot -> its parent;
* an ingest -> its expected digest (a blob being adopted from another namespace).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import NamedTuple

LABEL_ROOT = "containerd.io/gc.root"
LABEL_CONTENT_REF = "containerd.io/gc.ref.content"
LABEL_SNAPSHOT_REF = "containerd.io/gc.ref.snapshot."
LABEL_EXPIRE = "containerd.io/gc.expire"
LABEL_FLAT = "containerd.io/gc.flat"

# Lease resource types (runtimed.metadata.leases validates them).
RESOURCE_CONTENT = "content"
RESOURCE_INGESTS = "ingests"
RESOURCE_SNAPSHOTS = "snapshots/"

INGEST_EXPIRY_NS = 24 * 3600 * 10**9

_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


class Kind(StrEnum):
    CONTENT = "content"
    SNAPSHOT = "snapshot"
    INGEST = "ingest"
    LEASE = "lease"


class Node(NamedTuple):
    kind: Kind
    namespace: str
    key: str  # digest, snapshot key, ingest ref or lease id
    snapshotter: str = ""  # snapshots only

    @classmethod
    def content(cls, namespace: str, digest: str) -> Node:
        return cls(Kind.CONTENT, namespace, digest)

    @classmethod
    def snapshot(cls, namespace: str, snapshotter: str, key: str) -> Node:
        return cls(Kind.SNAPSHOT, namespace, key, snapshotter)

    @classmethod
    def ingest(cls, namespace: str, ref: str) -> Node:
        return cls(Kind.INGEST, namespace, ref)

    @classmethod
    def lease(cls, namespace: str, lease_id: str) -> Node:
        return cls(Kind.LEASE, namespace, lease_id)


@dataclass
class SnapshotRecord:
    parent: str = ""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class LeaseRecord:
    labels: dict[str, str] = field(default_factory=dict)
    resources: list[tuple[str, str]] = field(default_factory=list)  # (type, id)


@dataclass
class IngestRecord:
    expected: str = ""
    updated_at: int = 0  # ns since the epoch: the last write


@dataclass
class Holder:
    """An image or a container: a root through its own fields and its labels."""

    namespace: str
    refs: tuple[Node, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Resources:
    """Everything the mark reads, every namespace at once."""

    content: dict[Node, dict[str, str]] = field(default_factory=dict)  # -> labels
    snapshots: dict[Node, SnapshotRecord] = field(default_factory=dict)
    ingests: dict[Node, IngestRecord] = field(default_factory=dict)
    leases: dict[Node, LeaseRecord] = field(default_factory=dict)
    holders: list[Holder] = field(default_factory=list)


@dataclass
class Garbage:
    content: list[Node] = field(default_factory=list)
    snapshots: list[Node] = field(default_factory=list)
    ingests: list[Node] = field(default_factory=list)
    leases: list[Node] = field(default_factory=list)  # expired

    def __bool__(self) -> bool:
        return bool(self.content or self.snapshots or self.ingests or self.leases)


def parse_rfc3339(value: str) -> int | None:
    """ns since the epoch of an RFC3339 time (Go's time.RFC3339 accepts fractions), or None."""
    match = _RFC3339.fullmatch(value.strip())
    if match is None:
        return None
    text = match.group(0)
    fraction = match.group(1) or ""
    nanos = int((fraction[1:] + "000000000")[:9]) if fraction else 0
    if fraction:  # fromisoformat keeps microseconds at most; the ns are added back below
        text = text.replace(fraction, "", 1)
    try:
        moment = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
    except ValueError:
        return None
    return int(moment.timestamp()) * 10**9 + nanos


def lease_expired(labels: Mapping[str, str], now_ns: int) -> bool:
    """Whether a lease's gc.expire has passed; an unparsable value keeps the lease (containerd)."""
    value = labels.get(LABEL_EXPIRE)
    if value is None:
        return False
    expires = parse_rfc3339(value)
    return expires is not None and expires < now_ns


def label_refs(namespace: str, labels: Mapping[str, str]) -> Iterator[Node]:
    """The content and snapshots a label map references (in the same namespace)."""
    for key, value in labels.items():
        if not value:
            continue
        if key.startswith(LABEL_CONTENT_REF):
            rest = key[len(LABEL_CONTENT_REF) :]
            # Named references (`.config`, `.l.0`, `/x`) are allowed; the names mean nothing.
            if not rest or rest[0] in "./":
                yield Node.content(namespace, value)
        elif key.startswith(LABEL_SNAPSHOT_REF):
            snapshotter = key[len(LABEL_SNAPSHOT_REF) :].split("/", 1)[0]
            if snapshotter:
                yield Node.snapshot(namespace, snapshotter, value)


def lease_resource_node(namespace: str, resource_type: str, resource_id: str) -> Node | None:
    if resource_type == RESOURCE_CONTENT:
        return Node.content(namespace, resource_id)
    if resource_type == RESOURCE_INGESTS:
        return Node.ingest(namespace, resource_id)
    if resource_type.startswith(RESOURCE_SNAPSHOTS) and len(resource_type) > len(RESOURCE_SNAPSHOTS):
        return Node.snapshot(namespace, resource_type[len(RESOURCE_SNAPSHOTS) :], resource_id)
    return None


def roots(
    resources: Resources, now_ns: int, ingest_expiry_ns: int = INGEST_EXPIRY_NS
) -> Iterator[tuple[Node, bool]]:
    """(node, flat) for every root; flat roots keep their node (and snapshot parents) only."""
    for lease, record in resources.leases.items():
        if lease_expired(record.labels, now_ns):
            continue
        yield lease, False
        flat = LABEL_FLAT in record.labels
        for resource_type, resource_id in record.resources:
            node = lease_resource_node(lease.namespace, resource_type, resource_id)
            if node is not None:
                yield node, flat and node.kind != Kind.INGEST
    for holder in resources.holders:
        for node in (*holder.refs, *label_refs(holder.namespace, holder.labels)):
            yield node, False
    for node, labels in resources.content.items():
        if LABEL_ROOT in labels:
            yield node, False
    for node, snapshot in resources.snapshots.items():
        if LABEL_ROOT in snapshot.labels:
            yield node, False
    for node, ingest in resources.ingests.items():
        if now_ns - ingest.updated_at < ingest_expiry_ns:
            yield node, False


def references(resources: Resources, node: Node, *, flat: bool = False) -> Iterator[Node]:
    """What `node` keeps alive; `flat` follows snapshot parents only."""
    if node.kind == Kind.SNAPSHOT:
        snapshot = resources.snapshots.get(node)
        if snapshot is None:
            return  # a dead edge: a label naming a snapshot that does not exist
        if snapshot.parent:
            yield Node.snapshot(node.namespace, node.snapshotter, snapshot.parent)
        if not flat:
            yield from label_refs(node.namespace, snapshot.labels)
    elif node.kind == Kind.CONTENT and not flat:
        yield from label_refs(node.namespace, resources.content.get(node, {}))
    elif node.kind == Kind.INGEST:
        ingest = resources.ingests.get(node)
        if ingest is not None and ingest.expected:
            yield Node.content(node.namespace, ingest.expected)


def mark(resources: Resources, now_ns: int, ingest_expiry_ns: int = INGEST_EXPIRY_NS) -> set[Node]:
    """Every node reachable from a root (dead edges included: they are never swept anyway)."""
    marked: set[Node] = set()
    expanded: set[Node] = set()  # reached by a non-flat path: labels followed
    queue: deque[tuple[Node, bool]] = deque(roots(resources, now_ns, ingest_expiry_ns))
    while queue:
        node, flat = queue.popleft()
        if flat:
            if node in marked:
                continue
        elif node in expanded:
            continue
        else:
            expanded.add(node)
        marked.add(node)
        queue.extend((child, flat) for child in references(resources, node, flat=flat))
    return marked


def garbage(resources: Resources, marked: set[Node]) -> Garbage:
    """The existing objects no root reaches; leases are only ever unmarked when expired."""
    return Garbage(
        content=sorted(n for n in resources.content if n not in marked),
        snapshots=sorted(n for n in resources.snapshots if n not in marked),
        ingests=sorted(n for n in resources.ingests if n not in marked),
        leases=sorted(n for n in resources.leases if n not in marked),
    )


def removal_order(nodes: Iterable[Node], snapshots: Mapping[Node, SnapshotRecord]) -> list[Node]:
    """Snapshots children first (deepest first), so no removal meets a child still in place."""

    def depth(node: Node) -> int:
        seen = 0
        record = snapshots.get(node)
        while record is not None and record.parent and seen <= len(snapshots):
            seen += 1
            record = snapshots.get(Node.snapshot(node.namespace, node.snapshotter, record.parent))
        return seen

    return sorted(nodes, key=lambda n: (-depth(n), n))
