"""Mount what a snapshotter returns, the way containerd's mount.All does.

Mounts are runtimed.types.Mount values (type, source, options; target left empty: the caller
picks it). They are mounted with util-linux mount(8), in order, onto one target.

The mount data page: mount(2) copies at most one page (4096 bytes, NUL included) of options,
so an overlay over many layers with absolute lowerdir paths does not fit. Snapshotters still
return absolute paths (ctr and containerd's Go client mount them with mount.All, which shortens
them itself); this module does what mount.All does: when the options are too long, the lowerdirs
are rewritten relative to their common parent directory (<root>/snapshots, so each becomes
"<id>/fs") and mount(8) runs with that directory as its working directory, which the kernel
resolves relative paths against. That fits about 400 layers with 5-digit ids; overlayfs itself
stops at 500 lower layers.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

import structlog

from runtimed.errors import FailedPrecondition, Internal
from runtimed.types import Mount

log = structlog.get_logger("runtimed.mount")

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# Longest mount data string mount(2) takes: one page including the terminating NUL.
MAX_MOUNT_DATA = PAGE_SIZE - 1
# The kernel's OVL_MAX_STACK.
MAX_OVERLAY_LOWERS = 500
LOWERDIR = "lowerdir="


class MountError(Internal):
    """mount(8) or umount(8) failed; the message carries its stderr."""


def _lowerdir_index(options: Sequence[str]) -> int:
    for index, option in enumerate(options):
        if option.startswith(LOWERDIR):
            return index
    return -1


def compact_lowerdir(options: Sequence[str]) -> tuple[str | None, list[str]]:
    """(directory to mount from, options with lowerdirs relative to it); (None, options) if not possible."""
    index = _lowerdir_index(options)
    if index < 0:
        return None, list(options)
    dirs = options[index][len(LOWERDIR) :].split(":")
    if len(dirs) < 2 or not all(d.startswith("/") for d in dirs):
        return None, list(options)
    common = os.path.commonpath(dirs)
    if common == "/":
        return None, list(options)
    relative = [os.path.relpath(d, common) for d in dirs]
    compacted = [o for i, o in enumerate(options) if i != index]
    compacted.append(LOWERDIR + ":".join(relative))
    return common, compacted


def mount_plan(mount: Mount) -> tuple[str | None, list[str]]:
    """The working directory and options to mount `mount` with; raises when it cannot fit a page."""
    options = list(mount.options)
    if mount.type != "overlay" or len(",".join(options)) <= MAX_MOUNT_DATA:
        return None, options
    cwd, compacted = compact_lowerdir(options)
    if cwd is None or len(",".join(compacted)) > MAX_MOUNT_DATA:
        raise FailedPrecondition(
            f"overlay mount options are {len(','.join(compacted))} bytes, more than the kernel's "
            f"{MAX_MOUNT_DATA}-byte mount data limit even with relative lowerdirs"
        )
    return cwd, compacted


async def _run(argv: list[str], cwd: str | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode(errors="replace").strip()


async def mount_one(mount: Mount, target: str | os.PathLike[str]) -> None:
    cwd, options = mount_plan(mount)
    argv = ["mount", "-t", mount.type or "none"]
    if options:
        argv += ["-o", ",".join(options)]
    argv += [mount.source or "none", os.fspath(target)]
    code, output = await _run(argv, cwd)
    if code != 0:
        raise MountError(f"mount of {mount.type} {mount.source} on {os.fspath(target)} failed: {output}")
    log.debug("mounted", type=mount.type, target=os.fspath(target), relative_to=cwd)


async def mount_all(mounts: Sequence[Mount], target: str | os.PathLike[str]) -> None:
    """Mount each of `mounts`, in order, on `target`; on failure undo the ones already mounted."""
    done = 0
    try:
        for mount in mounts:
            await mount_one(mount, target)
            done += 1
    except BaseException:
        for _ in range(done):
            await unmount(target, missing_ok=True)
        raise


async def unmount(target: str | os.PathLike[str], *, lazy: bool = False, missing_ok: bool = False) -> None:
    """Unmount the top mount on `target` (lazily: detach it even while busy)."""
    argv = ["umount", *(["--lazy"] if lazy else []), os.fspath(target)]
    code, output = await _run(argv)
    if code != 0:
        if missing_ok and (
            "not mounted" in output or "no mount point" in output or not Path(target).exists()
        ):
            return
        raise MountError(f"umount of {os.fspath(target)} failed: {output}")
