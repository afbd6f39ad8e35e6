"""The overlayfs snapshotter: each snapshot is an overlay upper directory over its parents.

Mounts are containerd's (so ctr, the shim and Diff.Apply mount them unchanged):

* no parent: [bind <root>/snapshots/<id>/fs, options rw,rbind] (ro,rbind for a view);
* active with parents: [overlay "overlay", options index=off, workdir=<id>/work,
  upperdir=<id>/fs, lowerdir=<parent fs>:<grandparent fs>:...] (nearest parent first);
* view with one parent: [bind <parent>/fs, ro,rbind]; with several: a lowerdir-only overlay.

Paths are absolute. For images with so many layers that the options pass the kernel's one-page
mount data limit, plugins.snapshotters.mount rewrites the lowerdirs relative to <root>/snapshots
when mounting (as containerd's mount.All does); Prepare refuses chains that cannot fit even so,
or that exceed overlayfs' 500 lower layers, instead of returning mounts that cannot work.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import structlog

from plugins.snapshotters import mount as mountlib
from plugins.snapshotters.base import LocalSnapshotter
from plugins.snapshotters.types import Kind
from runtimed.errors import FailedPrecondition, PluginSkipped
from runtimed.plugin import InitContext, PluginType, Registration, host_platform
from runtimed.types import Mount

log = structlog.get_logger("runtimed.snapshotter")

INDEX_PARAMETER = Path("/sys/module/overlay/parameters/index")


def supports_index_off() -> bool:
    """containerd passes index=off whenever the kernel knows the option."""
    return INDEX_PARAMETER.exists()


class OverlaySnapshotter(LocalSnapshotter):
    plugin_id = "overlayfs"

    def __init__(self, *args, index_off: bool | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._index_off = supports_index_off() if index_off is None else index_off

    # A few mkdirs: create runs in one trip to the store's thread.
    populates_quickly = True

    async def _populate(self, staging: Path, kind: Kind, parents: list[int]) -> None:
        await asyncio.to_thread(self._populate_now, staging, kind, parents)

    def _populate_now(self, staging: Path, kind: Kind, parents: list[int]) -> None:
        fs = staging / "fs"
        fs.mkdir()
        os.chmod(fs, 0o755)  # not subject to the umask: a rootfs is 0755
        if kind == Kind.ACTIVE:
            (staging / "work").mkdir(mode=0o711)
        if parents:
            # The upper dir becomes the merged root: give it the parent's owner.
            st = os.stat(self.fs_path(parents[0]))
            os.lchown(fs, st.st_uid, st.st_gid)

    def _options(self, snapshot_id: int, kind: Kind, parents: list[int]) -> list[str]:
        options = ["index=off"] if self._index_off else []
        if kind == Kind.ACTIVE:
            options += [f"workdir={self.work_path(snapshot_id)}", f"upperdir={self.fs_path(snapshot_id)}"]
        options.append("lowerdir=" + ":".join(str(self.fs_path(p)) for p in parents))
        return options

    def _mounts(self, snapshot_id: int, kind: Kind, parents: list[int]) -> list[Mount]:
        if not parents:
            # overlay needs a lower layer: a base layer is a plain bind of its own directory.
            mode = "ro" if kind == Kind.VIEW else "rw"
            return [Mount(type="bind", source=str(self.fs_path(snapshot_id)), options=[mode, "rbind"])]
        if kind == Kind.VIEW and len(parents) == 1:
            return [Mount(type="bind", source=str(self.fs_path(parents[0])), options=["ro", "rbind"])]
        return [Mount(type="overlay", source="overlay", options=self._options(snapshot_id, kind, parents))]

    def _check_chain(self, key: str, kind: Kind, parents: list[int]) -> None:
        if len(parents) > mountlib.MAX_OVERLAY_LOWERS:
            raise FailedPrecondition(
                f"snapshot {key!r} would stack {len(parents)} layers; overlayfs allows at most "
                f"{mountlib.MAX_OVERLAY_LOWERS} (use the native snapshotter for such images)"
            )
        if kind == Kind.VIEW and len(parents) <= 1:
            return
        # The id of the new snapshot is not known yet: measure with a generous stand-in.
        options = self._options(10**12, kind, parents)
        try:
            mountlib.mount_plan(Mount(type="overlay", source="overlay", options=options))
        except FailedPrecondition as exc:
            raise FailedPrecondition(
                f"snapshot {key!r} over {len(parents)} layers cannot be mounted: {exc.reason} "
                "(use the native snapshotter for such images)"
            ) from None


def probe(root: Path) -> None:
    """Mount a tiny overlay on `root`'s filesystem and unmount it; PluginSkipped if that fails."""
    if os.geteuid() != 0:
        raise PluginSkipped("the overlayfs snapshotter needs root to mount; use the native snapshotter")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        raise PluginSkipped("mount(8)/umount(8) not found; install util-linux")
    base = Path(tempfile.mkdtemp(prefix="probe-", dir=root))
    merged = base / "merged"
    mounted = False
    try:
        for name in ("lower", "upper", "work", "merged"):
            (base / name).mkdir()
        (base / "lower" / "probe").write_text("ok")
        options = f"lowerdir={base / 'lower'},upperdir={base / 'upper'},workdir={base / 'work'}"
        if supports_index_off():
            options = "index=off," + options
        result = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise PluginSkipped(
                f"overlayfs does not work on the filesystem of {root} ({_fs_type(root)}): "
                f"{result.stderr.strip() or result.stdout.strip()}; load the overlay module, put the "
                "daemon root on ext4 or xfs, or use the native snapshotter"
            )
        mounted = True
        (merged / "written").write_text("ok")
        if (merged / "probe").read_text() != "ok" or not (base / "upper" / "written").exists():
            raise PluginSkipped(f"overlayfs on {root} does not behave (lower or upper not visible)")
    except OSError as exc:
        raise PluginSkipped(f"overlayfs probe on {root} failed: {exc}") from None
    finally:
        if mounted:
            subprocess.run(["umount", str(merged)], capture_output=True, timeout=30, check=False)
        shutil.rmtree(base, ignore_errors=True)


def _fs_type(path: Path) -> str:
    """The filesystem type of the mount holding `path`, for messages."""
    best, fs_type = "", "unknown filesystem"
    resolved = str(path.resolve())
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            point = fields[4]
            separator = fields.index("-")
            if (resolved == point or resolved.startswith(point.rstrip("/") + "/")) and len(point) >= len(
                best
            ):
                best, fs_type = point, fields[separator + 1]
    except (OSError, ValueError, IndexError):
        pass
    return fs_type


def _remove_stale_probes(root: Path) -> None:
    """A probe interrupted by a crash may have left its directory (and even its mount)."""
    for entry in root.glob("probe-*"):
        merged = entry / "merged"
        if os.path.ismount(merged):
            subprocess.run(["umount", "--lazy", str(merged)], capture_output=True, timeout=30, check=False)
        shutil.rmtree(entry, ignore_errors=True)


async def init(ctx: InitContext) -> OverlaySnapshotter:
    ctx.ensure_dirs()
    await asyncio.to_thread(_remove_stale_probes, ctx.root)
    await asyncio.to_thread(probe, ctx.root)
    snapshotter = await OverlaySnapshotter.open(ctx.root)
    ctx.exports["root"] = str(ctx.root)
    return snapshotter


PLUGINS = [
    Registration(
        type=PluginType.SNAPSHOTTER,
        id=OverlaySnapshotter.plugin_id,
        init=init,
        platforms=(host_platform(),),
    )
]
