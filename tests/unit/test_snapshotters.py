"""Snapshotter conformance suite, run against overlayfs and native (after containerd's snapshots/testsuite).

Tests that mount need root (and, for overlayfs, a kernel and filesystem where overlay works);
they mount with plugins.snapshotters.mount, i.e. `mount -t <type> -o <options> <source> <target>`,
and always unmount in finally blocks. The rest run anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from plugins.snapshotters import mount as mountlib
from plugins.snapshotters.base import LocalSnapshotter
from plugins.snapshotters.native import NativeSnapshotter
from plugins.snapshotters.overlay import OverlaySnapshotter, probe
from plugins.snapshotters.types import Info, Kind, Usage
from runtimed.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PluginSkipped
from runtimed.types import Mount

REPO_ROOT = Path(__file__).resolve().parents[2]
CLASSES: dict[str, type[LocalSnapshotter]] = {"overlayfs": OverlaySnapshotter, "native": NativeSnapshotter}
NS = "default"


@pytest.fixture(params=sorted(CLASSES))
def kind(request) -> str:
    return request.param


@pytest.fixture
async def open_snapshotter(kind, tmp_path):
    """open_snapshotter(root=None): a snapshotter of `kind` at root (default tmp_path/root), closed after."""
    opened: list[LocalSnapshotter] = []

    async def make(root: Path | None = None) -> LocalSnapshotter:
        snapshotter = await CLASSES[kind].open(root or tmp_path / "root")
        opened.append(snapshotter)
        return snapshotter

    yield make
    for snapshotter in opened:
        await snapshotter.close()


@pytest.fixture
async def sn(open_snapshotter) -> LocalSnapshotter:
    return await open_snapshotter()


@pytest.fixture
def mountable(kind, tmp_path) -> None:
    """Skip unless this snapshotter's mounts can really be mounted here."""
    if os.geteuid() != 0:
        pytest.skip("needs root: snapshot mounts are real mounts")
    if kind == "overlayfs":
        try:
            probe(tmp_path)
        except PluginSkipped as exc:
            pytest.skip(f"overlayfs unusable here: {exc}")


@contextlib.asynccontextmanager
async def mounted(mounts: list[Mount], target: Path) -> AsyncIterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    await mountlib.mount_all(mounts, target)
    try:
        yield target
    finally:
        for _ in mounts:
            await mountlib.unmount(target)


def write_tree(root: Path, files: dict[str, str]) -> None:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)


def tree(root: Path) -> dict[str, str]:
    """Every entry under root: files by content, directories and symlinks by kind and mode/target."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            relative = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[relative] = f"-> {os.readlink(path)}"
            elif stat.S_ISDIR(st.st_mode):
                out[relative] = f"dir {stat.S_IMODE(st.st_mode):o}"
            else:
                out[relative] = f"{stat.S_IMODE(st.st_mode):o} {path.read_text()}"
    return out


# ---------------------------------------------------------------------------------------------
# Basics: kinds, parents, stat, list


async def test_prepare_commit_chain_stat_and_list(sn):
    assert await sn.list(NS) == []
    await sn.prepare(NS, "a-active")
    info = await sn.stat(NS, "a-active")
    assert (info.name, info.parent, info.kind) == ("a-active", "", Kind.ACTIVE)
    assert info.created_at == info.updated_at > 0

    await sn.commit(NS, "a", "a-active", {"l": "1"})
    with pytest.raises(NotFound, match="snapshot a-active does not exist"):
        await sn.stat(NS, "a-active")
    committed = await sn.stat(NS, "a")
    assert (committed.name, committed.parent, committed.kind, committed.labels) == (
        "a",
        "",
        Kind.COMMITTED,
        {"l": "1"},
    )

    parent = "a"
    for layer in "bcd":
        await sn.prepare(NS, f"{layer}-active", parent)
        await sn.commit(NS, layer, f"{layer}-active")
        parent = layer
    await sn.prepare(NS, "top", "d")
    await sn.view(NS, "look", "d")

    listed = {i.name: (i.parent, i.kind) for i in await sn.list(NS)}
    assert listed == {
        "a": ("", Kind.COMMITTED),
        "b": ("a", Kind.COMMITTED),
        "c": ("b", Kind.COMMITTED),
        "d": ("c", Kind.COMMITTED),
        "look": ("d", Kind.VIEW),
        "top": ("d", Kind.ACTIVE),
    }
    assert [i.name for i in await sn.list(NS)] == sorted(listed)


async def test_keys_may_contain_spaces_and_any_characters(sn):
    chain_id = "sha256:" + "ab" * 32
    key = f"extract-1700000000000-abCD {chain_id}"
    await sn.prepare(NS, key, "", {"containerd.io/snapshot.ref": chain_id})
    await sn.commit(NS, chain_id, key)
    assert (await sn.stat(NS, chain_id)).kind == Kind.COMMITTED
    await sn.prepare(NS, "/a/path like key with ünïcode", chain_id)
    assert (await sn.stat(NS, "/a/path like key with ünïcode")).parent == chain_id


async def test_unpack_target_label_of_an_existing_snapshot_is_already_exists(sn):
    # containerd's unpacker labels Prepare with the chainID it will commit; when that exists, it stops.
    await sn.prepare(NS, "k")
    await sn.commit(NS, "sha256:layer", "k")
    with pytest.raises(AlreadyExists, match='target snapshot "sha256:layer"'):
        await sn.prepare(NS, "extract-1 sha256:layer", "", {"containerd.io/snapshot.ref": "sha256:layer"})


async def test_errors_are_the_ones_containerd_clients_branch_on(sn):
    with pytest.raises(NotFound) as missing:
        await sn.stat(NS, "nope")
    assert str(missing.value) == "snapshot nope does not exist: not found"
    with pytest.raises(NotFound, match="parent snapshot ghost does not exist"):
        await sn.prepare(NS, "k", "ghost")
    assert await sn.list(NS) == []  # nothing half-created

    await sn.prepare(NS, "active")
    with pytest.raises(AlreadyExists, match='snapshot "active": already exists'):
        await sn.prepare(NS, "active")
    with pytest.raises(AlreadyExists):
        await sn.view(NS, "active")
    with pytest.raises(InvalidArgument, match="is not committed"):
        await sn.prepare(NS, "child", "active")

    await sn.commit(NS, "done", "active")
    await sn.prepare(NS, "active2")
    with pytest.raises(AlreadyExists, match='snapshot "done"'):
        await sn.commit(NS, "done", "active2")
    with pytest.raises(AlreadyExists):  # the name is checked first, as in containerd
        await sn.commit(NS, "done", "no-such-key")
    with pytest.raises(NotFound, match="snapshot no-such-key does not exist"):
        await sn.commit(NS, "fresh", "no-such-key")
    with pytest.raises(FailedPrecondition, match="not active"):
        await sn.commit(NS, "fresh", "done")
    await sn.view(NS, "v", "done")
    with pytest.raises(FailedPrecondition, match="not active"):
        await sn.commit(NS, "fresh", "v")

    with pytest.raises(FailedPrecondition, match="not active or view"):
        await sn.mounts(NS, "done")
    assert await sn.mounts(NS, "v")  # a view has mounts
    with pytest.raises(NotFound):
        await sn.mounts(NS, "nope")
    with pytest.raises(NotFound):
        await sn.usage(NS, "nope")
    with pytest.raises(NotFound):
        await sn.remove(NS, "nope")
    with pytest.raises(FailedPrecondition) as busy:
        await sn.remove(NS, "done")
    assert str(busy.value) == "cannot remove snapshot with child: failed precondition"

    with pytest.raises(InvalidArgument):
        await sn.prepare(NS, "")
    with pytest.raises(InvalidArgument):
        await sn.commit(NS, "", "active2")
    with pytest.raises(InvalidArgument, match="label key"):
        await sn.prepare(NS, "labelled", "", {"": "x"})
    with pytest.raises(InvalidArgument, match="maximum size"):
        await sn.prepare(NS, "labelled", "", {"k": "v" * 5000})
    with pytest.raises(InvalidArgument):
        await sn.stat("bad namespace!", "k")


async def test_prepare_and_view_with_one_key_conflict(sn):
    # containerd's PrepareView test: a key is one snapshot, whatever its kind.
    await sn.prepare(NS, "p")
    await sn.commit(NS, "base", "p")
    await sn.prepare(NS, "new", "base")
    with pytest.raises(AlreadyExists):
        await sn.view(NS, "new", "base")
    await sn.view(NS, "view", "base")
    with pytest.raises(AlreadyExists):
        await sn.view(NS, "view", "base")
    with pytest.raises(AlreadyExists):
        await sn.prepare(NS, "view", "base")


async def test_remove_rules_and_key_reuse(sn):
    # containerd's Remove test.
    await sn.prepare(NS, "committed-a")
    await sn.commit(NS, "committed-1", "committed-a")
    await sn.prepare(NS, "reuse-1", "committed-1")
    await sn.remove(NS, "reuse-1")
    await sn.view(NS, "reuse-1", "committed-1")
    await sn.remove(NS, "reuse-1")
    await sn.prepare(NS, "reuse-1")
    await sn.remove(NS, "committed-1")
    await sn.commit(NS, "committed-1", "reuse-1")
    assert [(i.name, i.kind) for i in await sn.list(NS)] == [("committed-1", Kind.COMMITTED)]


async def test_remove_intermediate_needs_children_gone_first(sn):
    await sn.prepare(NS, "k1")
    await sn.commit(NS, "base", "k1")
    await sn.prepare(NS, "k2", "base")
    await sn.commit(NS, "middle", "k2")
    await sn.prepare(NS, "top", "middle")
    for blocked in ("base", "middle"):
        with pytest.raises(FailedPrecondition, match="cannot remove snapshot with child"):
            await sn.remove(NS, blocked)
    for key in ("top", "middle", "base"):
        await sn.remove(NS, key)
    assert await sn.list(NS) == []
    assert os.listdir(sn.snapshots_dir) == []  # directories go with their rows


async def test_update_labels_with_field_masks(sn):
    await sn.prepare(NS, "k", "", {"keep": "1", "drop": "2"})
    before = await sn.stat(NS, "k")
    await asyncio.sleep(0.001)

    updated = await sn.update(NS, Info(name="k", labels={"new": "3"}), ["labels.new", "labels.drop"])
    assert updated.labels == {"keep": "1", "new": "3"}
    assert updated.created_at == before.created_at and updated.updated_at > before.updated_at
    assert (updated.kind, updated.parent) == (Kind.ACTIVE, "")
    assert (await sn.stat(NS, "k")).labels == {"keep": "1", "new": "3"}

    assert (await sn.update(NS, Info(name="k", labels={"only": "x"}), ["labels"])).labels == {"only": "x"}
    assert (await sn.update(NS, Info(name="k", labels={"all": "y"}))).labels == {"all": "y"}
    assert (await sn.update(NS, Info(name="k", labels={"all": ""}), ["labels.all"])).labels == {}

    with pytest.raises(InvalidArgument, match='cannot update "parent" field'):
        await sn.update(NS, Info(name="k", parent="x"), ["parent"])
    with pytest.raises(InvalidArgument):
        await sn.update(NS, Info(name="", labels={}), ["labels"])
    with pytest.raises(InvalidArgument):
        await sn.update(NS, Info(name="k", labels={"k": "v" * 5000}), ["labels.k"])
    with pytest.raises(NotFound, match="snapshot nope does not exist"):
        await sn.update(NS, Info(name="nope"), ["labels"])


async def test_walk_filters_and_batches(sn):
    await sn.prepare(NS, "k")
    await sn.commit(NS, "base", "k", {"tier": "gold"})
    await sn.prepare(NS, "child-a", "base", {"app": "web"})
    await sn.view(NS, "child-v", "base")
    for i in range(230):  # more than two walk pages
        await sn.view(NS, f"many-{i:03d}", "base")

    async def names(*exprs: str) -> list[str]:
        return [i.name for i in await sn.list(NS, list(exprs))]

    assert len(await names()) == 233
    assert await names("kind==committed") == ["base"]
    assert await names("kind==active") == ["child-a"]
    assert await names('labels."tier"==gold') == ["base"]
    assert await names("labels.app==web", "kind==committed") == ["base", "child-a"]  # OR across strings
    assert await names("parent==base,name~=^child") == ["child-a", "child-v"]
    assert await names('parent==""') == ["base"]
    assert len(await names("name~=^many-")) == 230
    with pytest.raises(InvalidArgument):
        await names("name==")


async def test_namespaces_are_isolated(sn):
    await sn.prepare("ns-a", "k1", "", {"owner": "a"})
    await sn.prepare("ns-b", "k1", "", {"owner": "b"})
    assert (await sn.stat("ns-a", "k1")).labels == {"owner": "a"}
    assert (await sn.stat("ns-b", "k1")).labels == {"owner": "b"}
    await sn.commit("ns-a", "c1", "k1")
    with pytest.raises(NotFound, match="parent snapshot c1 does not exist"):
        await sn.prepare("ns-b", "k2", "c1")
    with pytest.raises(NotFound):
        await sn.stat("ns-b", "c1")
    with pytest.raises(NotFound):
        await sn.remove("ns-b", "c1")
    assert [i.name for i in await sn.list("ns-a")] == ["c1"]
    assert [i.name for i in await sn.list("ns-b")] == ["k1"]
    assert await sn.has_snapshots("ns-a") and await sn.has_snapshots("ns-b")
    assert not await sn.has_snapshots("ns-c")
    await sn.remove("ns-b", "k1")
    assert not await sn.has_snapshots("ns-b")
    assert (await sn.stat("ns-a", "c1")).kind == Kind.COMMITTED


async def test_concurrent_prepares(sn):
    results = await asyncio.gather(*(sn.prepare(NS, f"k{i}") for i in range(20)))
    assert len({m[0].source for m in results}) == 20
    same = await asyncio.gather(*(sn.prepare(NS, "same") for _ in range(8)), return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in same) == 1
    assert all(isinstance(r, AlreadyExists) for r in same if isinstance(r, BaseException))
    assert len(os.listdir(sn.snapshots_dir)) == 21  # the losers left no directories


async def test_close_twice(sn):
    await sn.prepare(NS, "k")
    await sn.commit(NS, "c", "k")
    await sn.remove(NS, "c")
    await sn.close()
    await sn.close()


# ---------------------------------------------------------------------------------------------
# Mount shapes


async def test_mount_shapes(sn, kind):
    base_mounts = await sn.prepare(NS, "k1")
    assert len(base_mounts) == 1 and base_mounts[0].type == "bind"
    assert base_mounts[0].options == ["rw", "rbind"] and base_mounts[0].target == ""
    assert base_mounts[0].source.startswith(str(sn.snapshots_dir) + "/")
    assert await sn.mounts(NS, "k1") == base_mounts
    await sn.commit(NS, "l1", "k1")
    await sn.prepare(NS, "k2", "l1")
    await sn.commit(NS, "l2", "k2")

    one_parent_view = await sn.view(NS, "v1", "l1")
    two_parent_view = await sn.view(NS, "v2", "l2")
    active = await sn.prepare(NS, "a", "l2")
    empty_view = await sn.view(NS, "v0")
    assert empty_view[0].type == "bind" and empty_view[0].options == ["ro", "rbind"]
    assert one_parent_view[0].type == "bind" and one_parent_view[0].options == ["ro", "rbind"]
    if kind == "native":
        assert active[0].type == "bind" and active[0].options == ["rw", "rbind"]
        assert two_parent_view[0].type == "bind" and two_parent_view[0].options == ["ro", "rbind"]
        return
    options = active[0].options
    assert (active[0].type, active[0].source) == ("overlay", "overlay")
    upper = next(o for o in options if o.startswith("upperdir="))
    work = next(o for o in options if o.startswith("workdir="))
    lower = next(o for o in options if o.startswith("lowerdir="))
    assert upper.endswith("/fs") and work.endswith("/work")
    lowers = lower[len("lowerdir=") :].split(":")
    assert len(lowers) == 2 and lowers[1] == one_parent_view[0].source  # nearest parent first
    assert two_parent_view[0].type == "overlay"
    assert [o for o in two_parent_view[0].options if o.startswith(("upperdir", "workdir"))] == []
    assert two_parent_view[0].options[-1] == lower


# ---------------------------------------------------------------------------------------------
# Filesystem behaviour through real mounts


async def commit_layer(sn, work: Path, name: str, parent: str, change) -> None:
    """Prepare on `parent`, mount, apply change(root), unmount, commit as `name`."""
    key = f"{name}-active"
    target = work / key
    async with mounted(await sn.prepare(NS, key, parent), target) as root:
        change(root)
    await sn.commit(NS, name, key)


@pytest.mark.root
async def test_layers_overwrite_whiteout_rename_and_remove_dirs(sn, mountable, tmp_path):
    def layer1(root: Path) -> None:
        write_tree(root, {"a": "A1", "b": "B1", "keep": "K", "dir/x": "X", "dir/sub/y": "Y", "moveme": "M"})
        os.symlink("keep", root / "link")

    def layer2(root: Path) -> None:
        (root / "a").write_text("A2")
        (root / "b").unlink()  # overlay records a whiteout in the upper dir
        shutil.rmtree(root / "dir")  # a whole directory of the lower layer
        os.rename(root / "moveme", root / "moved")
        (root / "newdir").mkdir(mode=0o700)
        os.chmod(root / "newdir", 0o700)

    def layer3(root: Path) -> None:
        (root / "dir").mkdir()  # re-created: must not show the old lower contents (opaque)
        (root / "dir" / "z").write_text("Z")

    await commit_layer(sn, tmp_path, "l1", "", layer1)
    await commit_layer(sn, tmp_path, "l2", "l1", layer2)
    await commit_layer(sn, tmp_path, "l3", "l2", layer3)

    expected = {
        "a": "644 A2",
        "keep": "644 K",
        "link": "-> keep",
        "moved": "644 M",
        "newdir": "dir 700",
        "dir": "dir 755",
        "dir/z": "644 Z",
    }
    async with mounted(await sn.view(NS, "view", "l3"), tmp_path / "view") as root:
        assert tree(root) == expected
    # The intermediate layer still reads as it was committed.
    async with mounted(await sn.view(NS, "view-l2", "l2"), tmp_path / "view-l2") as root:
        assert tree(root) == {
            "a": "644 A2",
            "keep": "644 K",
            "link": "-> keep",
            "moved": "644 M",
            "newdir": "dir 700",
        }
    # And the base layer is untouched by its children.
    async with mounted(await sn.view(NS, "view-l1", "l1"), tmp_path / "view-l1") as root:
        assert (root / "b").read_text() == "B1" and (root / "dir" / "sub" / "y").read_text() == "Y"


@pytest.mark.root
async def test_view_is_read_only(sn, mountable, tmp_path):
    await commit_layer(sn, tmp_path, "base", "", lambda root: write_tree(root, {"f": "x"}))
    await commit_layer(sn, tmp_path, "second", "base", lambda root: write_tree(root, {"g": "y"}))
    for key, parent in (("v-one", "base"), ("v-two", "second"), ("v-none", "")):
        async with mounted(await sn.view(NS, key, parent), tmp_path / key) as root:
            with pytest.raises(OSError) as refused:
                (root / "new").write_text("no")
            assert refused.value.errno == 30  # EROFS
        # Mounts() of a view gives the same read-only mounts again.
        assert await sn.mounts(NS, key) == await sn.mounts(NS, key)


@pytest.mark.root
async def test_root_permission_owner_and_special_files(sn, mountable, tmp_path):
    def base(root: Path) -> None:
        write_tree(root, {"owned": "o", "setuid": "s"})
        os.chown(root / "owned", 1000, 1000)
        os.chmod(root / "setuid", 0o4755)
        os.link(root / "owned", root / "hardlink")
        os.mkfifo(root / "fifo")
        os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.setxattr(root / "owned", "user.note", b"kept")
        os.symlink("/etc/passwd", root / "abs-link")
        os.utime(root / "setuid", ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))

    async with mounted(await sn.prepare(NS, "fresh"), tmp_path / "fresh") as root:
        assert stat.S_IMODE(root.stat().st_mode) == 0o755  # containerd's RootPermission
    await sn.remove(NS, "fresh")

    await commit_layer(sn, tmp_path, "base", "", base)
    await commit_layer(sn, tmp_path, "chown", "base", lambda root: os.chown(root / "owned", 2000, 2000))
    async with mounted(await sn.prepare(NS, "top", "chown"), tmp_path / "top") as root:
        owned = (root / "owned").stat()
        assert (owned.st_uid, owned.st_gid) == (2000, 2000)
        assert os.getxattr(root / "owned", "user.note") == b"kept"
        assert stat.S_IMODE((root / "setuid").stat().st_mode) == 0o4755
        assert (root / "setuid").stat().st_mtime_ns == 1_000_000_000_000_000_000
        assert stat.S_ISFIFO((root / "fifo").lstat().st_mode)
        null = (root / "null").lstat()
        assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
        assert os.readlink(root / "abs-link") == "/etc/passwd"
        assert (root / "hardlink").stat().st_nlink == 2
    async with mounted(await sn.view(NS, "base-view", "base"), tmp_path / "base-view") as root:
        assert (root / "owned").stat().st_uid == 1000  # the parent is never written through a child


@pytest.mark.root
async def test_usage(sn, mountable, kind, tmp_path):
    mounts = await sn.prepare(NS, "k")
    empty = await sn.usage(NS, "k")
    assert empty.inodes == 1 and empty.size > 0  # the root directory itself
    async with mounted(mounts, tmp_path / "k") as root:
        (root / "blob").write_bytes(os.urandom(1 << 20))
        os.link(root / "blob", root / "blob-link")  # counted once
    active = await sn.usage(NS, "k")
    assert active.inodes == 2
    assert (1 << 20) <= active.size - empty.size <= (1 << 20) + 65536

    await sn.commit(NS, "c", "k")
    assert await sn.usage(NS, "c") == active  # recorded at commit
    await sn.view(NS, "v", "c")
    assert await sn.usage(NS, "v") == Usage(0, 0)

    await sn.prepare(NS, "child", "c")
    child = await sn.usage(NS, "child")
    if kind == "overlayfs":
        assert child.inodes == 1  # only its own (empty) upper dir
    else:
        assert child == active  # a full copy of the parent


@pytest.mark.root
async def test_128_layers_mount(sn, mountable, kind, tmp_path):
    """containerd's 128LayersMount: for overlayfs the options outgrow one mount data page."""
    flat = tmp_path / "flat"
    flat.mkdir()

    def lowest(root: Path) -> None:
        write_tree(
            root, {"bottom": "way at the bottom\n", "overwriteme": "FIRST!\n", "ONLYME/bottom": "bye!\n"}
        )
        (root / "ADDHERE").mkdir()

    def layer(i: int):
        def apply(root: Path) -> None:
            (root / "overwriteme").write_text(f"{i} WAS HERE!\n")
            (root / "ADDHERE" / f"file-{i}").write_text("same\n")
            shutil.rmtree(root / "ONLYME")
            (root / "ONLYME").mkdir()
            (root / "ONLYME" / f"file-{i}").write_text("only me!\n")

        return apply

    parent = ""
    for i, apply in enumerate([lowest] + [layer(i) for i in range(1, 128)]):
        key, target = f"prepare-{i}", tmp_path / "work" / f"prepare-{i}"
        async with mounted(await sn.prepare(NS, key, parent), target) as root:
            assert tree(root) == tree(flat), f"layer {i} before apply"
            apply(flat)
            apply(root)
        parent = f"committed-{i}"
        await sn.commit(NS, parent, key)

    mounts = await sn.view(NS, "fullview", parent)
    if kind == "overlayfs":
        assert len(",".join(mounts[0].options)) > mountlib.MAX_MOUNT_DATA  # compaction was needed
    async with mounted(mounts, tmp_path / "fullview") as root:
        assert tree(root) == tree(flat)


async def test_overlay_refuses_chains_it_cannot_mount(tmp_path):
    sn = await OverlaySnapshotter.open(tmp_path / "root")
    try:
        with pytest.raises(FailedPrecondition, match="at most 500"):
            sn._check_chain("k", Kind.ACTIVE, list(range(1, 502)))
        with pytest.raises(FailedPrecondition, match="mount data limit"):
            sn._check_chain("k", Kind.ACTIVE, list(range(10**6, 10**6 + 480)))
        sn._check_chain("k", Kind.ACTIVE, list(range(1, 400)))  # fits once relative
    finally:
        await sn.close()


def test_compact_lowerdir_like_containerd():
    options = [
        "index=off",
        "workdir=/r/snapshots/9/work",
        "upperdir=/r/snapshots/9/fs",
        "lowerdir=/r/snapshots/8/fs:/r/snapshots/10/fs",
    ]
    assert mountlib.compact_lowerdir(options) == (
        "/r/snapshots",
        ["index=off", "workdir=/r/snapshots/9/work", "upperdir=/r/snapshots/9/fs", "lowerdir=8/fs:10/fs"],
    )
    assert mountlib.compact_lowerdir(["lowerdir=/r/1/fs"]) == (None, ["lowerdir=/r/1/fs"])
    assert mountlib.compact_lowerdir(["lowerdir=/a/fs:/b/fs"]) == (None, ["lowerdir=/a/fs:/b/fs"])
    short = Mount(type="overlay", source="overlay", options=options)
    assert mountlib.mount_plan(short) == (None, options)


# ---------------------------------------------------------------------------------------------
# Persistence and crash safety


async def test_restart_keeps_everything(open_snapshotter, tmp_path):
    first = await open_snapshotter()
    await first.prepare(NS, "k", "", {"a": "1"})
    await first.commit(NS, "c", "k")
    mounts = await first.prepare("other", "x")
    await first.prepare(NS, "top", "c")
    before = {ns: await first.list(ns) for ns in (NS, "other")}
    active_mounts = await first.mounts(NS, "top")
    await first.close()

    second = await open_snapshotter()
    assert {ns: await second.list(ns) for ns in (NS, "other")} == before
    assert await second.mounts(NS, "top") == active_mounts
    assert await second.mounts("other", "x") == mounts
    # Ids keep counting: a new snapshot never gets an old directory.
    new = await second.prepare(NS, "after", "c")
    assert new != active_mounts and sorted(os.listdir(second.snapshots_dir)) == ["1", "2", "3", "4"]


async def test_cleanup_reclaims_orphans_left_by_a_crash(open_snapshotter, tmp_path):
    sn = await open_snapshotter()
    await sn.prepare(NS, "k")
    await sn.commit(NS, "c", "k")
    await sn.prepare(NS, "live", "c")
    await sn.close()

    snapshots = tmp_path / "root" / "snapshots"
    write_tree(snapshots / "new-0123456789abcdef" / "fs", {"half": "copied"})  # staging, crash mid-copy
    write_tree(snapshots / "77" / "fs", {"no": "row"})  # renamed in, transaction never committed
    write_tree(snapshots / "trash-5-abcd" / "fs", {"being": "removed"})
    (snapshots / "stray-file").write_text("?")

    reopened = await open_snapshotter()
    assert sorted(os.listdir(snapshots)) == ["1", "2"]
    assert [i.name for i in await reopened.list(NS)] == ["c", "live"]


async def test_a_rolled_back_create_never_shadows_the_next_one(sn):
    """The id of a create whose commit failed is handed out again; its directory must not win."""
    await sn.prepare(NS, "victim")
    with sqlite3.connect(sn.root / "metadata.db") as conn:  # the row "never committed"
        conn.execute("DELETE FROM snapshots WHERE name = 'victim'")
        conn.execute("UPDATE sqlite_sequence SET seq = seq - 1 WHERE name = 'snapshots'")
    write_tree(sn.fs_path(1), {"stale": "data"})
    mounts = await sn.prepare(NS, "next")
    assert mounts[0].source == str(sn.fs_path(1))
    assert os.listdir(sn.fs_path(1)) == []
    await sn.cleanup()
    assert os.listdir(sn.snapshots_dir) == ["1"]


async def test_failed_populate_leaves_nothing(tmp_path, monkeypatch):
    sn = await NativeSnapshotter.open(tmp_path / "root")
    try:
        await sn.prepare(NS, "k")
        await sn.commit(NS, "c", "k")

        async def broken(*_args) -> None:
            raise OSError("disk full")

        monkeypatch.setattr("plugins.snapshotters.native.copy_tree", broken)
        with pytest.raises(OSError, match="disk full"):
            await sn.prepare(NS, "child", "c")
        assert os.listdir(sn.snapshots_dir) == ["1"]
        with pytest.raises(NotFound):
            await sn.stat(NS, "child")
    finally:
        await sn.close()


async def test_cancelled_prepare_leaves_no_trace(tmp_path):
    """A client that hangs up mid-copy: no staging directory, no half-made snapshot, no cp left."""
    sn = await NativeSnapshotter.open(tmp_path / "root")
    try:
        mounts = await sn.prepare(NS, "big")
        write_tree(Path(mounts[0].source), {f"d{i // 100}/f{i}": "x" * 512 for i in range(1000)})
        await sn.commit(NS, "base", "big")
        for delay in (0.0, 0.005, 0.02, 0.05, 0.2):
            task = asyncio.create_task(sn.prepare(NS, f"child-{delay}", "base"))
            await asyncio.sleep(delay)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            rows = {
                str(i)
                for i in await sn._meta.read(
                    lambda conn: {r["id"] for r in conn.execute("SELECT id FROM snapshots")}
                )
            }
            assert set(os.listdir(sn.snapshots_dir)) == rows  # every directory is a snapshot's
        assert subprocess.run(["pgrep", "-P", str(os.getpid()), "cp"], capture_output=True).stdout == b""
    finally:
        await sn.close()


@pytest.mark.root
async def test_remove_never_deletes_through_a_mount(sn, mountable, tmp_path):
    mounts = await sn.prepare(NS, "k")
    inner = Path(mounts[0].source) / "mnt"
    inner.mkdir()
    outside = tmp_path / "precious"
    write_tree(outside, {"file": "keep me"})
    subprocess.run(["mount", "--bind", str(outside), str(inner)], check=True)
    try:
        await sn.remove(NS, "k")  # the row goes; the directory stays for cleanup
        await sn.cleanup()
        assert (outside / "file").read_text() == "keep me"
        assert os.listdir(sn.snapshots_dir) != []
    finally:
        subprocess.run(["umount", str(inner)], check=True)
    await sn.cleanup()
    assert os.listdir(sn.snapshots_dir) == []
    assert (outside / "file").read_text() == "keep me"


CRASH_WORKER = r"""
import asyncio, logging, os, random, sys
from pathlib import Path
import structlog
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
from plugins.snapshotters.native import NativeSnapshotter
from plugins.snapshotters.overlay import OverlaySnapshotter

async def main():
    cls = {"overlayfs": OverlaySnapshotter, "native": NativeSnapshotter}[sys.argv[1]]
    sn = await cls.open(Path(sys.argv[2]))
    rng, n = random.Random(), 0
    print("ready", flush=True)
    while True:
        n += 1
        committed = [i.name for i in await sn.list("default", ["kind==committed"])]
        parent = rng.choice(committed) if committed and rng.random() < 0.7 else ""
        key = f"k-{os.getpid()}-{n}"
        mounts = await sn.prepare("default", key, parent)
        if mounts[0].type == "bind":
            for j in range(16):
                Path(mounts[0].source, f"f{j}").write_bytes(os.urandom(4096))
        roll = rng.random()
        if roll < 0.6:
            await sn.commit("default", f"c-{os.getpid()}-{n}", key)
        elif roll < 0.8:
            await sn.remove("default", key)
        if committed and rng.random() < 0.4:
            try:
                await sn.remove("default", rng.choice(committed))
            except Exception:
                pass

asyncio.run(main())
"""


def _rows_and_dirs(root: Path) -> tuple[set[str], set[str]]:
    conn = sqlite3.connect(root / "metadata.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        rows = {str(r[0]) for r in conn.execute("SELECT id FROM snapshots")}
    finally:
        conn.close()
    return rows, set(os.listdir(root / "snapshots"))


async def test_kill_9_at_random_points_leaves_a_consistent_store(kind, tmp_path, open_snapshotter):
    root = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    rng = random.Random(1234)
    errors = tmp_path / "worker.err"
    for _ in range(5):
        with open(errors, "wb") as stderr:
            worker = subprocess.Popen(
                [sys.executable, "-c", CRASH_WORKER, kind, str(root)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        try:
            assert worker.stdout is not None
            assert worker.stdout.readline() == b"ready\n", errors.read_text()
            time.sleep(rng.uniform(0.05, 0.6))
            assert worker.poll() is None, errors.read_text()
        finally:
            worker.send_signal(signal.SIGKILL)  # our own child, by pid
            worker.wait()
            worker.stdout.close()
        rows, dirs = _rows_and_dirs(root)
        assert rows <= dirs  # every snapshot has its directory; extra entries are orphans
        for snapshot_id in rows:
            assert (root / "snapshots" / snapshot_id / "fs").is_dir()

    sn = await open_snapshotter(root)  # cleanup runs at open
    rows, dirs = _rows_and_dirs(root)
    assert rows == dirs and rows
    # And the store is usable: every committed snapshot can parent a new one.
    for info in await sn.list(NS, ["kind==committed"]):
        await sn.view(NS, f"check {info.name}", info.name)
