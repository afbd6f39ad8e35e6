"""Core values of the content store (protobuf messages stay at the gRPC edge)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ContentInfo:
    """A blob as one namespace sees it."""

    digest: str
    size: int
    labels: dict[str, str] = field(default_factory=dict)
    created_at: int = 0  # ns since the epoch
    updated_at: int = 0


@dataclass
class IngestStatus:
    """An ingest (a write in progress, or left by an earlier stream) under its ref."""

    ref: str
    offset: int = 0  # bytes written so far
    total: int = 0  # expected size, 0 when unknown
    expected: str = ""  # expected digest, "" when unknown
    started_at: int = 0  # ns since the epoch
    updated_at: int = 0
