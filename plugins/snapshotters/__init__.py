"""Snapshotters: per-namespace snapshot stores that hand out mounts (overlayfs, native).

`base` defines the interface every snapshotter implements and `LocalSnapshotter`, the shared
SQLite-plus-directories implementation that `overlay` and `native` specialise; `mount` mounts
what a snapshotter returns (including overlay mounts too long for one mount data page).
"""

from plugins.snapshotters.base import Info, Kind, LocalSnapshotter, Snapshotter, Usage

__all__ = ["Info", "Kind", "LocalSnapshotter", "Snapshotter", "Usage"]
