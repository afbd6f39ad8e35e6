"""Task directories: removal tolerates what an exiting shim removes at the same moment."""

import asyncio
import os

from runtimed.tasks import bundle as bundles


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
