"""The native snapshotter: every active snapshot is a full copy of its parent; mounts are binds.

It works on any filesystem and needs no kernel feature, at the cost of disk space and copy time
(reflinks make the copy cheap on btrfs/xfs). The copy is `cp -a --reflink=auto`, which keeps
owners, modes, timestamps, xattrs, hardlinks, symlinks, device nodes and sparse files.

Mounts, as containerd's native snapshotter gives them:
* active: [bind <root>/snapshots/<id>/fs, rw,rbind];
* view: [bind <parent>/fs, ro,rbind] (a view needs no copy of its own; its own empty fs when it
  has no parent).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from plugins.snapshotters.base import LocalSnapshotter
from plugins.snapshotters.types import Kind
from runtimed.errors import Internal, PluginSkipped
from runtimed.plugin import InitContext, PluginType, Registration, host_platform
from runtimed.types import Mount


class NativeSnapshotter(LocalSnapshotter):
    plugin_id = "native"

    async def _populate(self, staging: Path, kind: Kind, parents: list[int]) -> None:
        fs = staging / "fs"
        if not parents or kind == Kind.VIEW:

            def make() -> None:
                fs.mkdir()
                os.chmod(fs, 0o755)  # not subject to the umask: a rootfs is 0755

            await asyncio.to_thread(make)
            return
        await copy_tree(self.fs_path(parents[0]), fs)

    def _mounts(self, snapshot_id: int, kind: Kind, parents: list[int]) -> list[Mount]:
        if kind == Kind.VIEW:
            source = self.fs_path(parents[0]) if parents else self.fs_path(snapshot_id)
            return [Mount(type="bind", source=str(source), options=["ro", "rbind"])]
        return [Mount(type="bind", source=str(self.fs_path(snapshot_id)), options=["rw", "rbind"])]


async def copy_tree(source: Path, destination: Path) -> None:
    """Copy directory `source` to the new path `destination`, keeping everything a rootfs has."""
    process = await asyncio.create_subprocess_exec(
        "cp",
        "-a",
        "--reflink=auto",
        "--",
        str(source),
        str(destination),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await process.communicate()
    except BaseException:
        # Cancelled: stop the copy before the caller discards the half-made directory.
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    if process.returncode != 0:
        raise Internal(f"copying snapshot {source} failed: {stderr.decode(errors='replace').strip()}")


async def init(ctx: InitContext) -> NativeSnapshotter:
    if shutil.which("cp") is None:
        raise PluginSkipped("cp(1) not found; install coreutils")
    ctx.ensure_dirs()
    snapshotter = await NativeSnapshotter.open(ctx.root)
    ctx.exports["root"] = str(ctx.root)
    return snapshotter


PLUGINS = [
    Registration(
        type=PluginType.SNAPSHOTTER,
        id=NativeSnapshotter.plugin_id,
        init=init,
        platforms=(host_platform(),),
    )
]
