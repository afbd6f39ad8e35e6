"""The volume filesystem helpers on real directories: removal that never leaves the tree, path
resolution that never leaves the root, copies that keep what they copy."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from runtimed.errors import InvalidArgument
from runtimed.volumes import fs


def test_remove_tree_never_follows_symlinks_out(tmp_path):
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "precious").write_text("keep me")
    tree = tmp_path / "tree"
    (tree / "a").mkdir(parents=True)
    (tree / "a" / "to-dir").symlink_to(outside)
    (tree / "a" / "to-sub").symlink_to("../../outside/sub")
    (tree / "to-file").symlink_to(outside / "sub" / "precious")
    (tree / "a" / "data").write_bytes(b"12345")
    assert fs.remove_tree(tree) == 5
    assert not tree.exists()
    assert (outside / "sub" / "precious").read_text() == "keep me"
    assert fs.remove_tree(tree) == 0  # already gone


def test_remove_tree_handles_deep_trees_without_recursion(tmp_path):
    tree = tmp_path / "deep"
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    os.mkdir("deep", dir_fd=fd)
    current = os.open("deep", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    os.close(fd)
    for _ in range(1500):  # deeper than Python's recursion limit, shallower than PATH_MAX allows
        os.mkdir("d", dir_fd=current)
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=current)
        os.close(current)
        current = child
    os.close(current)
    assert fs.remove_tree(tree) == 0
    assert not tree.exists()


def test_resolve_in_root_stays_inside(tmp_path):
    root = tmp_path / "root"
    (root / "data" / "sub").mkdir(parents=True)
    (root / "up").symlink_to("../../../../data")
    (root / "abs").symlink_to("/data/sub")
    (root / "loop1").symlink_to("loop2")
    (root / "loop2").symlink_to("loop1")
    (root / "file").write_text("x")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        cases = [
            ("/up", root / "data"),
            ("/abs/..", root / "data"),
            ("/../../data/sub", root / "data" / "sub"),
            ("/", root),
        ]
        for path, expected in cases:
            resolved = fs.resolve_in_root(fd, path)
            assert resolved is not None, path
            try:
                assert (resolved.info.st_ino, stat.S_ISDIR(resolved.info.st_mode)) == (
                    expected.stat().st_ino,
                    True,
                )
            finally:
                os.close(resolved.parent_fd)
        assert fs.resolve_in_root(fd, "/missing/x") is None
        assert fs.resolve_in_root(fd, "/file/x") is None
        assert fs.resolve_in_root(fd, "/" + "n" * 300) is None
        with pytest.raises(InvalidArgument, match="too many levels of symbolic links"):
            fs.resolve_in_root(fd, "/loop1")
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")
def test_copy_tree_keeps_owners_set_id_bits_and_hard_links(tmp_path):
    source, target = tmp_path / "source", tmp_path / "target"
    (source / "bin").mkdir(parents=True)
    tool = source / "bin" / "tool"
    tool.write_bytes(b"#!/bin/sh\n")
    os.chown(tool, 0, 50)
    os.chmod(tool, 0o4755)
    os.link(tool, source / "bin" / "tool-link")
    target.mkdir()
    src_fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY)
    dst_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fs.copy_tree(src_fd, dst_fd)
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    copied = (target / "bin" / "tool").stat()
    assert (copied.st_gid, stat.S_IMODE(copied.st_mode)) == (50, 0o4755)
    assert copied.st_ino == (target / "bin" / "tool-link").stat().st_ino and copied.st_nlink == 2


def test_mounts_at_or_below_reads_escaped_mountinfo(tmp_path):
    assert fs.mounts_at_or_below(Path("/proc"))[0] == "/proc"
    assert fs.mounts_at_or_below(tmp_path / "nothing here") == []
    assert fs.filesystem_type(Path("/proc")) == "proc"
