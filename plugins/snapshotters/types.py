"""Core values of the snapshotter interface (protobuf stays at the gRPC edge)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple


class Kind(IntEnum):
    """A snapshot's state; the numbers are containerd.services.snapshots.v1.Kind's."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def filter_value(self) -> str:
        """The value filters compare `kind` with (containerd: active, view, committed)."""
        return self.name.lower()


@dataclass
class Info:
    name: str
    parent: str = ""
    kind: Kind = Kind.UNKNOWN
    created_at: int = 0  # ns since the epoch
    updated_at: int = 0
    labels: dict[str, str] = field(default_factory=dict)


class Usage(NamedTuple):
    size: int  # bytes allocated (st_blocks * 512), hardlinks counted once
    inodes: int
