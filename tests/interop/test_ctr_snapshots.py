"""`ctr snapshots` against runtimed, for overlayfs and native; the mount commands ctr prints are run."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

SNAPSHOTTERS = ["overlayfs", "native"]

pytestmark = pytest.mark.root


def rows(output: str) -> list[list[str]]:
    """ctr's tab-aligned table, header first, split into cells."""
    return [line.split() for line in output.strip().splitlines()]


@pytest.fixture(params=SNAPSHOTTERS)
def snap(request, daemon, run_ctr, client):
    """snap(*args, check=True, namespace=None): `ctr snapshots --snapshotter <s> args...`."""
    if os.geteuid() != 0:
        pytest.skip("needs root: ctr's mount commands are real mounts")
    loaded = {p.id for p in client.plugins(["type==io.containerd.snapshotter.v1"]) if not p.init_err.message}
    if request.param not in loaded:
        pytest.skip(f"snapshotter {request.param} did not load on this host")

    def run(*args: str, check: bool = True, namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_ctr(
            daemon.address,
            "snapshots",
            "--snapshotter",
            request.param,
            *args,
            check=check,
            namespace=namespace,
        )

    run.snapshotter = request.param  # type: ignore[attr-defined]
    return run


def mount_printed(output: str, target: Path) -> list[str]:
    """Run the `mount -t T SRC TARGET -o OPTS` lines ctr printed; return them."""
    lines = [line for line in output.strip().splitlines() if line.startswith("mount ")]
    assert lines, output
    target.mkdir(parents=True, exist_ok=True)
    for line in lines:
        argv = shlex.split(line)
        assert argv[4] == str(target), line
        subprocess.run(argv, check=True, capture_output=True, text=True)
    return lines


def umount(target: Path, times: int = 1) -> None:
    for _ in range(times):
        subprocess.run(["umount", str(target)], check=True)


def test_prepare_commit_ls_info_mounts_usage_rm(snap, tmp_path):
    snap("prepare", "k1")
    assert rows(snap("ls").stdout) == [["KEY", "PARENT", "KIND"], ["k1", "Active"]]

    # Fill the base layer through the mount command ctr prints for it.
    base = tmp_path / "base"
    printed = mount_printed(snap("mounts", str(base), "k1").stdout, base)
    try:
        assert printed[0].startswith("mount -t bind ") and printed[0].endswith(" -o rw,rbind")
        (base / "etc").mkdir()
        (base / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (base / "gone").write_text("to be deleted")
    finally:
        umount(base, len(printed))

    snap("commit", "c1", "k1")
    snap("prepare", "k2", "c1")
    assert rows(snap("ls").stdout) == [["KEY", "PARENT", "KIND"], ["c1", "Committed"], ["k2", "c1", "Active"]]

    info = json.loads(snap("info", "k2").stdout)
    assert (info["Name"], info["Parent"], info["Kind"]) == ("k2", "c1", "Active")
    assert "containerd.io/gc.root" in info["Labels"]  # ctr labels what it prepares
    assert json.loads(snap("info", "c1").stdout)["Kind"] == "Committed"

    # The printed mount command really works: the child sees and shadows its parent.
    merged = tmp_path / "x"
    printed = mount_printed(snap("mounts", str(merged), "k2").stdout, merged)
    try:
        expected_type = "overlay" if snap.snapshotter == "overlayfs" else "bind"
        assert printed[0].split()[2] == expected_type
        assert (merged / "etc" / "passwd").read_text().startswith("root:")
        (merged / "gone").unlink()
        (merged / "new").write_text("child")
    finally:
        umount(merged, len(printed))
    snap("commit", "c2", "k2")

    view = tmp_path / "view"
    snap("view", "v2", "c2")
    printed = mount_printed(snap("mounts", str(view), "v2").stdout, view)
    try:
        assert sorted(os.listdir(view)) == ["etc", "new"]
        with pytest.raises(OSError):
            (view / "nope").write_text("read-only")
    finally:
        umount(view, len(printed))

    usage = rows(snap("usage", "-b").stdout)
    assert usage[0] == ["KEY", "SIZE", "INODES"]
    by_key = {row[0]: (int(row[1]), int(row[2])) for row in usage[1:]}
    assert set(by_key) == {"c1", "c2", "v2"}
    assert by_key["c1"][1] == 4  # fs, etc, etc/passwd, gone
    assert by_key["v2"] == (0, 0)
    assert rows(snap("usage", "c1").stdout)[1][0] == "c1"

    refused = snap("rm", "c1", check=False)
    assert refused.returncode != 0
    assert "cannot remove snapshot with child: failed precondition" in refused.stderr
    snap("rm", "v2", "c2", "c1")
    assert rows(snap("ls").stdout) == [["KEY", "PARENT", "KIND"]]


def test_prepare_with_target_view_label_and_tree(snap, tmp_path):
    snap("prepare", "base-key")
    snap("commit", "base", "base-key")
    target = tmp_path / "t"
    out = snap("prepare", "--target", str(target), "work", "base").stdout
    printed = mount_printed(out, target)
    try:
        (target / "hello").write_text("hi")
    finally:
        umount(target, len(printed))
    assert "base" in snap("tree").stdout

    labelled = snap("label", "base", "team=storage").stdout
    assert "team=storage" in labelled
    snap("label", "base", "team=")
    assert "team" not in json.loads(snap("info", "base").stdout).get("Labels", {})

    out = snap("view", "--target", str(target), "look", "base").stdout
    printed = mount_printed(out, target)
    try:
        assert os.listdir(target) == []  # the view sees base, not work's uncommitted file
    finally:
        umount(target, len(printed))


def test_errors_and_namespaces(snap, daemon, run_ctr):
    missing = snap("info", "nope", check=False)
    assert missing.returncode != 0
    assert "snapshot nope does not exist: not found" in missing.stderr
    orphan = snap("prepare", "k", "no-parent", check=False)
    assert "parent snapshot no-parent does not exist: not found" in orphan.stderr
    snap("prepare", "k")
    duplicate = snap("prepare", "k", check=False)
    assert duplicate.returncode != 0 and "already exists" in duplicate.stderr
    not_active = snap("mounts", "/tmp/unused", "nope", check=False)
    assert "not found" in not_active.stderr

    snap("prepare", "k", namespace="team-a")
    assert rows(snap("ls", namespace="team-a").stdout) == [["KEY", "PARENT", "KIND"], ["k", "Active"]]
    assert "team-a" in run_ctr(daemon.address, "namespaces", "ls", "-q").stdout.split()
    snap("rm", "k", namespace="team-a")
    assert rows(snap("ls").stdout)[1:] == [["k", "Active"]]

    unknown = run_ctr(daemon.address, "snapshots", "--snapshotter", "zfs", "ls", check=False)
    assert unknown.returncode != 0
    assert "snapshotter not loaded: zfs: invalid argument" in unknown.stderr
