"""Paths inside a root directory, resolved the way a chroot would see them."""

from __future__ import annotations

import errno
import os
from pathlib import Path

MAX_SYMLINK_HOPS = 40  # Linux's MAXSYMLINKS


def follow_in_root(root: Path, path: str, *, follow_last: bool = True) -> list[str]:
    """The components `path` leads to below `root`, its symlinks followed inside the root:
    an absolute target restarts from the root and ".." stops there, so nothing leads outside.
    Lexical (one readlink per component): for trees nobody else is changing meanwhile.
    Raises OSError(ELOOP) after MAX_SYMLINK_HOPS links."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if (parts or follow_last) and candidate.is_symlink():
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return resolved
