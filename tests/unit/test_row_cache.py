"""Row caches of the metadata database: hot reads never see a row older than a finished write.

Whoever changes a row (the stores, the garbage collector's raw SQL, a rolled-back transaction),
the next read after that write returns what the database holds.
"""

from __future__ import annotations

import sqlite3

import pytest

from runtimed.content.store import ContentStore
from runtimed.errors import NotFound
from runtimed.events.exchange import Exchange
from runtimed.metadata.plugin import open_metadata
from runtimed.types import AnyValue, Container, Descriptor, Image, Namespace, RuntimeInfo

SPEC = AnyValue("types.containerd.io/opencontainers/runtime-spec/1/Spec", b'{"ociVersion":"1.0.2"}')
DIGEST = "sha256:" + "a" * 64


@pytest.fixture
async def meta(tmp_path):
    store = await open_metadata(tmp_path / "meta.db", Exchange())
    yield store
    await store.close()


def container(cid: str = "c1", **kwargs) -> Container:
    return Container(id=cid, runtime=RuntimeInfo("io.containerd.runc.v2"), spec=SPEC, **kwargs)


async def test_container_reads_follow_updates_deletes_and_raw_sql(meta):
    await meta.containers.create("ns", container(labels={"a": "1"}))
    assert (await meta.containers.get("ns", "c1")).labels == {"a": "1"}
    await meta.containers.update("ns", container(labels={"a": "2"}), ["labels"])
    assert (await meta.containers.get("ns", "c1")).labels == {"a": "2"}

    def raw(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE containers SET image = 'raw' WHERE namespace = 'ns' AND id = 'c1'")

    await meta.db.write(raw)
    assert (await meta.containers.get("ns", "c1")).image == "raw"
    await meta.containers.delete("ns", "c1")
    with pytest.raises(NotFound):
        await meta.containers.get("ns", "c1")


async def test_a_rolled_back_write_leaves_reads_at_the_committed_row(meta):
    await meta.containers.create("ns", container(image="before"))
    assert (await meta.containers.get("ns", "c1")).image == "before"

    def failing(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE containers SET image = 'uncommitted' WHERE id = 'c1'")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await meta.db.write(failing)
    assert (await meta.containers.get("ns", "c1")).image == "before"


async def test_changing_a_returned_value_does_not_change_the_next_read(meta):
    await meta.containers.create("ns", container(labels={"a": "1"}))
    got = await meta.containers.get("ns", "c1")
    got.labels["a"] = "changed"
    got.runtime.name = "changed"
    again = await meta.containers.get("ns", "c1")
    assert again.labels == {"a": "1"} and again.runtime.name == "io.containerd.runc.v2"

    target = Descriptor("application/vnd.oci.image.manifest.v1+json", DIGEST, 1, {"k": "v"})
    await meta.images.create("ns", Image(name="img", target=target, labels={"l": "1"}))
    got_image = await meta.images.get("ns", "img")
    got_image.labels.clear()
    got_image.target.annotations.clear()
    again_image = await meta.images.get("ns", "img")
    assert again_image.labels == {"l": "1"} and again_image.target.annotations == {"k": "v"}


async def test_namespace_and_image_reads_follow_writes(meta):
    await meta.namespaces.create(Namespace("team", {"a": "1"}))
    assert (await meta.namespaces.get("team")).labels == {"a": "1"}
    await meta.namespaces.update(Namespace("team", {"a": "2"}), ["labels"])
    assert (await meta.namespaces.get("team")).labels == {"a": "2"}
    await meta.namespaces.delete("team")
    with pytest.raises(NotFound):
        await meta.namespaces.get("team")

    target = Descriptor("application/vnd.oci.image.manifest.v1+json", DIGEST, 1)
    await meta.images.create("ns", Image(name="img", target=target))
    assert (await meta.images.get("ns", "img")).labels == {}
    await meta.images.update("ns", Image(name="img", target=target, labels={"x": "y"}), ["labels"])
    assert (await meta.images.get("ns", "img")).labels == {"x": "y"}
    await meta.images.delete("ns", "img")
    with pytest.raises(NotFound):
        await meta.images.get("ns", "img")


async def test_content_records_follow_the_collectors_raw_deletes(meta, tmp_path):
    store = ContentStore(tmp_path / "content", meta.db, Exchange())
    await store.open()
    async with store.writer("ns", "ref") as writer:
        await writer.write(b"data", 0)
        await writer.commit(4, "", {"k": "v"})
    digest = writer.digest()
    assert (await store.info("ns", digest)).labels == {"k": "v"}
    assert b"".join([c async for c in store.read("ns", digest)]) == b"data"

    def sweep(conn: sqlite3.Connection) -> None:  # what the garbage collector does
        conn.execute("DELETE FROM content WHERE namespace = 'ns' AND digest = ?", (digest,))

    await meta.db.write(sweep)
    with pytest.raises(NotFound):
        await store.info("ns", digest)
    with pytest.raises(NotFound):
        [c async for c in store.read("ns", digest)]


async def test_a_value_stored_on_commit_needs_the_commit_and_the_row_unchanged_after_it(meta):
    cache = meta.db.row_cache("volumes", ("namespace", "name"))
    key = ("ns", "v")

    def insert(conn: sqlite3.Connection, then_fail: bool = False, then_change: bool = False) -> None:
        conn.execute("INSERT OR IGNORE INTO namespaces(name, created_at, updated_at) VALUES ('ns', 1, 1)")
        conn.execute("INSERT INTO volumes(namespace, name, labels, created_at) VALUES ('ns', 'v', '{}', 1)")
        meta.db.cache_on_commit(cache, key, "as inserted")
        if then_change:
            conn.execute("UPDATE volumes SET labels = '{\"x\": \"y\"}' WHERE namespace = 'ns' AND name = 'v'")
        if then_fail:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await meta.db.write(insert, True)
    assert cache.get(key) is None
    await meta.db.write(insert, False, True)
    assert cache.get(key) is None  # changed again after the value was offered
    await meta.db.write(lambda conn: conn.execute("DELETE FROM volumes"))
    await meta.db.write(insert)
    assert cache.get(key) == "as inserted"
    await meta.db.write(lambda conn: conn.execute("DELETE FROM volumes"))
    assert cache.get(key) is None


async def test_a_created_container_and_snapshot_are_read_back_as_written(meta, tmp_path):
    created = await meta.containers.create(
        "ns", container(labels={"a": "1"}, snapshotter="s", snapshot_key="k")
    )
    got = await meta.containers.get("ns", "c1")
    assert got == created

    from plugins.snapshotters.native import NativeSnapshotter
    from plugins.snapshotters.overlay import OverlaySnapshotter

    for kind in (NativeSnapshotter, OverlaySnapshotter):
        sn = await kind.open(tmp_path / kind.plugin_id)
        try:
            await sn.prepare("ns", "base", labels={"l": "1"})
            await sn.commit("ns", "c", "base")
            mounts = await sn.prepare("ns", "top", "c", labels={"m": "2"})
            assert await sn.mounts("ns", "top") == mounts
            stat = await sn.stat("ns", "top")
            assert [i for i in await sn.list("ns") if i.name == "top"] == [stat]
        finally:
            await sn.close()
