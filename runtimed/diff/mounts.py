"""What a list of snapshot mounts means for the layer code: a directory to work in, or a temp mount.

The snapshotters hand out two shapes that need no mounting at all:
- one bind mount (`type` "bind", or any type with a "bind"/"rbind" option): the directory is `source`;
- one overlay mount with an `upperdir=`: the writable layer is the upperdir, the layers below it are
  `lowerdir=` (topmost first).
Anything else is mounted on a private temporary directory for the duration of the work and always
unmounted afterwards (lazily if it is still busy).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from runtimed.errors import FailedPrecondition, InvalidArgument, q
from runtimed.types import Mount

log = structlog.get_logger("runtimed.diff")

MOUNT_TIMEOUT = 60


@dataclass(frozen=True)
class OverlayLayers:
    """An overlay mount taken apart: the upperdir (None when read-only) and the lowerdirs, top first."""

    upper: Path | None
    lowers: tuple[Path, ...]


def directory(path: str, what: str) -> Path:
    """A directory named by a client's mount: it must be absolute (never the daemon's cwd) and NUL-free."""
    if not path or "\x00" in path or not os.path.isabs(path):
        raise InvalidArgument(f"{what} {q(path[:256])} must be an absolute path")
    return Path(path)


def is_bind(mount: Mount) -> bool:
    return mount.type == "bind" or "bind" in mount.options or "rbind" in mount.options


def is_readonly(mount: Mount) -> bool:
    return "ro" in mount.options


def overlay_layers(mount: Mount) -> OverlayLayers:
    if mount.type != "overlay":
        raise InvalidArgument(f"mount of type {mount.type!r} is not an overlay")
    upper: Path | None = None
    lowers: tuple[Path, ...] = ()
    for option in mount.options:
        if option.startswith("upperdir="):
            upper = directory(option.removeprefix("upperdir="), "overlay upperdir")
        elif option.startswith("lowerdir="):
            lowers = tuple(
                directory(p, "overlay lowerdir") for p in option.removeprefix("lowerdir=").split(":") if p
            )
    if not lowers:
        raise InvalidArgument("overlay mount without a lowerdir")
    return OverlayLayers(upper, lowers)


def directory_layers(mounts: Sequence[Mount]) -> tuple[Path, ...] | None:
    """The stack of directories (top first) that a mount list shows, when it is a bind or an overlay.

    None when the mounts have another shape (they would need mounting to be read).
    """
    if not mounts:
        return ()
    if len(mounts) != 1:
        return None
    mount = mounts[0]
    if is_bind(mount):
        return (directory(mount.source, "bind mount source"),)
    if mount.type == "overlay":
        layers = overlay_layers(mount)
        return ((layers.upper,) if layers.upper else ()) + layers.lowers
    return None


def _run(argv: list[str]) -> None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=MOUNT_TIMEOUT, check=False)
    except ValueError as exc:  # a NUL byte in an argument
        raise InvalidArgument(f"{argv[0]}: invalid mount argument: {exc}") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FailedPrecondition(f"{argv[0]}: {exc}") from exc
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip() or f"exit status {result.returncode}"
        raise FailedPrecondition(f"{' '.join(argv)}: {message}")


def mount_all(mounts: Sequence[Mount], target: Path, *, readonly: bool = False) -> int:
    """Mount each mount on `target`, in order (later ones stack on earlier); returns how many succeeded."""
    done = 0
    try:
        for mount in mounts:
            options = [o for o in mount.options if o]
            if readonly and "ro" not in options:
                options = [o for o in options if o != "rw"] + ["ro"]
            argv = ["mount", "-n", "-t", mount.type or "none"]
            if options:
                argv += ["-o", ",".join(options)]
            argv += ["--", mount.source or "none", str(target)]
            _run(argv)
            done += 1
    except BaseException:
        unmount_all(target, done)
        raise
    return done


def unmount_all(target: Path, count: int) -> None:
    for _ in range(count):
        try:
            _run(["umount", "-n", str(target)])
        except FailedPrecondition as exc:
            log.warning("unmount failed, detaching lazily", target=str(target), error=str(exc))
            with contextlib.suppress(FailedPrecondition):
                _run(["umount", "-n", "-l", str(target)])


@contextlib.contextmanager
def temp_mount(mounts: Sequence[Mount], *, readonly: bool = False) -> Iterator[Path]:
    """Mount `mounts` on a fresh private (0700) directory; always unmounted and removed afterwards."""
    if not mounts:
        raise InvalidArgument("no mounts given")
    if os.geteuid() != 0:
        raise FailedPrecondition("mounting a layer target needs root")
    target = Path(tempfile.mkdtemp(prefix="runtimed-mount-"))
    count = 0
    try:
        count = mount_all(mounts, target, readonly=readonly)
        yield target
    finally:
        unmount_all(target, count)
        with contextlib.suppress(OSError):
            target.rmdir()
