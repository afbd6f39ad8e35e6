"""Core values of runtimed. Protobuf messages stay at the gRPC edge; the core uses these."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from runtimed.platforms import Platform


def now_ns() -> int:
    return time.time_ns()


@dataclass(frozen=True)
class AnyValue:
    """An opaque google.protobuf.Any from a client, stored and returned byte for byte."""

    type_url: str
    value: bytes = b""


@dataclass
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    # Only in index entries: which platform the manifest is for.
    platform: Platform | None = None


@dataclass
class Mount:
    type: str
    source: str
    target: str = ""
    options: list[str] = field(default_factory=list)


@dataclass
class Namespace:
    name: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class RuntimeInfo:
    name: str
    options: AnyValue | None = None


@dataclass
class Container:
    id: str
    runtime: RuntimeInfo
    spec: AnyValue | None = None
    labels: dict[str, str] = field(default_factory=dict)
    image: str = ""
    snapshotter: str = ""
    snapshot_key: str = ""
    sandbox: str = ""
    extensions: dict[str, AnyValue] = field(default_factory=dict)
    created_at: int = 0
    updated_at: int = 0


@dataclass
class Image:
    name: str
    target: Descriptor
    labels: dict[str, str] = field(default_factory=dict)
    created_at: int = 0
    updated_at: int = 0


@dataclass
class Lease:
    id: str
    labels: dict[str, str] = field(default_factory=dict)
    created_at: int = 0


@dataclass(frozen=True)
class LeaseResource:
    id: str
    # "content", "snapshots/<snapshotter>" or "ingests"
    type: str
