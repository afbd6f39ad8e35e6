"""Task directories: removal tolerates what an exiting shim removes at the same moment."""

import asyncio
import os
import subprocess

import pytest

from runtimed.tasks import bundle as bundles
from runtimed.types import Mount


def test_remove_tolerates_a_record_the_shim_unlinks_meanwhile(tmp_path, monkeypatch):
    task_dir = tmp_path / "ns" / "c1"
    bundles.make_directory(task_dir)
    (task_dir / bundles.TASK_RECORD).write_text("{}")
    (task_dir / bundles.SHIM_RECORD).write_text("{}")
    (task_dir / "shim.log").write_text("")
    real_scandir = os.scandir

    def scandir_then_shim_exits(path):
        entries = list(real_scandir(path))
        os.unlink(task_dir / bundles.SHIM_RECORD)  # the shim's finish() wins the race
        return iter(entries)

    monkeypatch.setattr(bundles.os, "scandir", scandir_then_shim_exits)
    asyncio.run(bundles.remove(task_dir))
    assert not task_dir.exists()
    assert not (tmp_path / "ns").exists()  # the namespace directory goes with its last task


def test_make_directory_recreates_a_namespace_directory_removed_in_between(tmp_path):
    namespace_dir = tmp_path / "ns"
    bundles.make_directory(namespace_dir / "a")
    os.rmdir(namespace_dir / "a")
    os.rmdir(namespace_dir)  # what remove() of the namespace's last task does
    bundles.make_directory(namespace_dir / "b")
    assert (namespace_dir / "b").is_dir()
    assert oct((namespace_dir / "b").stat().st_mode & 0o777) == oct(0o700)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")
def test_unmount_all_unstacks_every_mount_and_remove_refuses_nothing_else(tmp_path):
    task_dir = tmp_path / "ns" / "c1"
    bundles.make_directory(task_dir)
    rootfs = task_dir / bundles.ROOTFS
    source = tmp_path / "source"
    source.mkdir()
    (source / "file").write_text("x")
    asyncio.run(bundles.mount_rootfs([Mount("bind", str(source), options=["rbind", "ro"])], rootfs))
    assert (rootfs / "file").read_text() == "x" and bundles.is_mounted(rootfs)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(rootfs)], check=True)  # stacked on top
    asyncio.run(bundles.unmount_all(rootfs))
    assert not bundles.is_mounted(rootfs) and not (rootfs / "file").exists()
    asyncio.run(bundles.unmount_all(rootfs))  # nothing mounted: fine
    asyncio.run(bundles.unmount_all(tmp_path / "missing"))  # no such path: fine
    asyncio.run(bundles.remove(task_dir))
    assert not task_dir.exists() and (source / "file").exists()
