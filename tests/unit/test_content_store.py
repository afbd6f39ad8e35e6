"""The content store on real files and a real SQLite database: verification, resume, locking,
namespace isolation, delete and label semantics, lease bookkeeping."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os

import pytest

from runtimed.content import ContentInfo, ContentStore
from runtimed.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    Unavailable,
)
from runtimed.events.exchange import Exchange
from runtimed.metadata.plugin import open_metadata
from runtimed.types import LeaseResource

MIB = 1 << 20


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


EMPTY = sha(b"")


@pytest.fixture
async def events():
    return Exchange()


@pytest.fixture
async def meta(tmp_path, events):
    store = await open_metadata(tmp_path / "meta.db", events)
    yield store
    await store.close()


@pytest.fixture
async def store(tmp_path, meta, events):
    content = ContentStore(tmp_path / "content", meta.db, events)
    await content.open()
    yield content
    await content.close()


def blob_files(store: ContentStore) -> list[str]:
    return sorted(os.listdir(store.root / "blobs" / "sha256"))


def ingest_dirs(store: ContentStore) -> list[str]:
    return sorted(os.listdir(store.root / "ingest"))


async def read_all(store: ContentStore, ns: str, digest: str, offset: int = 0, size: int = 0) -> bytes:
    return b"".join([chunk async for chunk in store.read(ns, digest, offset, size)])


async def write_blob(store: ContentStore, ns: str, ref: str, data: bytes, **commit) -> str:
    async with store.writer(ns, ref, total=len(data)) as writer:
        await writer.write(data)
        return await writer.commit(len(data), **commit)


async def test_verified_commit_makes_the_blob_visible(store):
    data = os.urandom(3 * MIB + 17)
    async with store.writer("default", "layer-1", total=len(data), expected=sha(data)) as writer:
        status = writer.status()
        assert (status.ref, status.offset, status.total, status.expected) == (
            "layer-1",
            0,
            len(data),
            sha(data),
        )
        assert writer.digest() == EMPTY
        for start in range(0, len(data), MIB):
            offset = await writer.write(data[start : start + MIB], start)
            assert offset == min(start + MIB, len(data))
        assert writer.digest() == sha(data)
        # Not visible before the commit.
        with pytest.raises(NotFound):
            await store.info("default", sha(data))
        assert await writer.commit(len(data), sha(data), {"app": "web"}) == sha(data)
    info = await store.info("default", sha(data))
    assert (info.digest, info.size, info.labels) == (sha(data), len(data), {"app": "web"})
    assert info.created_at > 0 and info.updated_at == info.created_at
    assert blob_files(store) == [sha(data).split(":")[1]]
    assert ingest_dirs(store) == []
    path = await store.blob_path("default", sha(data))
    assert path.read_bytes() == data
    assert path.stat().st_mode & 0o777 == 0o444
    assert await read_all(store, "default", sha(data)) == data


async def test_digest_mismatch_stores_nothing(store):
    data = b"hello world"
    wrong = sha(b"something else")
    async with store.writer("default", "ref", total=len(data)) as writer:
        await writer.write(data)
        with pytest.raises(FailedPrecondition) as info:
            await writer.commit(len(data), wrong)
    assert f"unexpected commit digest {sha(data)}, expected {wrong}" in str(info.value)
    assert blob_files(store) == []
    assert ingest_dirs(store) == []
    assert await store.list("default") == []
    with pytest.raises(NotFound):
        await store.status("default", "ref")


async def test_size_mismatch_keeps_the_ingest_for_a_resume(store):
    data = b"0123456789"
    async with store.writer("default", "ref") as writer:
        await writer.write(data[:4])
        with pytest.raises(FailedPrecondition, match="failed size validation: 4 != 10"):
            await writer.commit(len(data))
    assert (await store.status("default", "ref")).offset == 4
    async with store.writer("default", "ref") as writer:
        await writer.write(data[4:], 4)
        assert await writer.commit(len(data), sha(data)) == sha(data)


async def test_resume_after_a_broken_stream(store):
    data = os.urandom(MIB + 1000)
    half = len(data) // 2
    async with store.writer("default", "big", total=len(data)) as writer:
        await writer.write(data[:half])
    # The writer is gone (stream ended without commit): the ingest stays, unlocked.
    status = await store.status("default", "big")
    assert (status.offset, status.total) == (half, len(data))
    assert [s.ref for s in await store.list_statuses("default")] == ["big"]
    async with store.writer("default", "big", total=len(data)) as writer:
        assert writer.status().offset == half
        assert writer.status().started_at == status.started_at
        assert writer.digest() == sha(data[:half])  # re-hashed from disk
        with pytest.raises(OutOfRange, match=f"write @1 must occur at current offset {half}"):
            await writer.write(data[half:], 1)
        await writer.write(data[half:], half)
        await writer.commit(len(data), sha(data))
    assert await read_all(store, "default", sha(data)) == data


async def test_resume_after_a_restart(tmp_path, meta, events):
    data = os.urandom(200_000)
    first = ContentStore(tmp_path / "content", meta.db, events)
    await first.open()
    writer = first.writer("default", "r", total=len(data))
    await writer.open()
    await writer.write(data[:150_000])
    # A crash: nothing closed. A new store instance (a restarted daemon) on the same root.
    second = ContentStore(tmp_path / "content", meta.db, events)
    await second.open()
    async with second.writer("default", "r", total=len(data)) as resumed:
        assert resumed.status().offset == 150_000
        await resumed.write(data[150_000:], 150_000)
        assert await resumed.commit(len(data), sha(data)) == sha(data)
    assert await read_all(second, "default", sha(data)) == data


async def test_offset_zero_truncates(store):
    async with store.writer("default", "t") as writer:
        await writer.write(b"garbage", 0)
        assert await writer.write(b"good", 0) == 4
        assert writer.digest() == sha(b"good")
        assert await writer.commit(4) == sha(b"good")


async def test_a_total_change_restarts_the_ingest(store):
    async with store.writer("default", "t", total=10) as writer:
        await writer.write(b"12345")
    async with store.writer("default", "t", total=3) as writer:
        assert (writer.status().offset, writer.status().total) == (0, 3)


async def test_one_writer_per_ref(store):
    async with store.writer("default", "locked") as writer:
        with pytest.raises(Unavailable, match="ref locked locked for"):
            async with store.writer("default", "locked"):
                pass
        with pytest.raises(Unavailable):
            await store.abort("default", "locked")
        # Another namespace, or another ref, is another ingest.
        async with store.writer("other", "locked"), store.writer("default", "free"):
            pass
        await writer.write(b"x")
    # Released however the writer ended: normally, by an error, or by cancellation.
    async with store.writer("default", "locked"):
        pass
    with pytest.raises(RuntimeError):
        async with store.writer("default", "locked"):
            raise RuntimeError("boom")
    opened = asyncio.Event()

    async def hold() -> None:
        async with store.writer("default", "locked"):
            opened.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(hold())
    await opened.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with store.writer("default", "locked") as writer:
        assert writer.status().offset == 1  # the byte written above, resumed


async def test_namespace_isolation_and_adoption(store):
    data = b"shared layer bytes"
    await write_blob(store, "a", "ref", data)
    for call in (
        store.info("b", sha(data)),
        store.blob_path("b", sha(data)),
        read_all(store, "b", sha(data)),
        store.delete("b", sha(data)),
        store.update("b", ContentInfo(sha(data), 0, {"k": "v"}), []),
    ):
        with pytest.raises(NotFound, match=f"content digest {sha(data)}: not found"):
            await call
    assert await store.list("b") == []
    # B names the digest: nothing to upload (offset = size), the commit adopts it.
    async with store.writer("b", "ref", total=len(data), expected=sha(data)) as writer:
        status = writer.status()
        assert (status.offset, status.total) == (len(data), len(data))
        assert writer.digest() == sha(data)
        assert await store.list_statuses("b") == []  # no data of its own
        assert await writer.commit(len(data), sha(data), {"adopted": "yes"}) == sha(data)
    info = await store.info("b", sha(data))
    assert (info.size, info.labels) == (len(data), {"adopted": "yes"})
    assert await read_all(store, "b", sha(data)) == data
    assert blob_files(store) == [sha(data).split(":")[1]] and ingest_dirs(store) == []
    # A third namespace uploading the same bytes without naming them ends up the same.
    assert await write_blob(store, "c", "ref", data) == sha(data)
    assert blob_files(store) == [sha(data).split(":")[1]]


async def test_adoption_then_writing_anyway_copies_the_blob(store):
    data = b"abcdef"
    await write_blob(store, "a", "ref", data)
    async with store.writer("b", "ref", expected=sha(data)) as writer:
        assert writer.status().offset == len(data)
        await writer.write(b"", 0)  # the client restarts from zero
        assert writer.status().offset == 0
        await writer.write(data)
        assert await writer.commit(len(data), sha(data)) == sha(data)
    assert (await store.info("b", sha(data))).size == len(data)


async def test_already_exists_at_open_and_at_commit(store):
    data = b"exists"
    await write_blob(store, "default", "one", data)
    with pytest.raises(AlreadyExists, match=f"content {sha(data)}: already exists"):
        async with store.writer("default", "two", expected=sha(data)):
            pass
    with pytest.raises(AlreadyExists, match=f"content {sha(data)}: already exists"):
        await write_blob(store, "default", "three", data)
    assert ingest_dirs(store) == []
    assert [i.digest for i in await store.list("default")] == [sha(data)]


async def test_empty_blob(store):
    async with store.writer("default", "empty") as writer:
        assert await writer.commit(0, EMPTY) == EMPTY
    assert (await store.info("default", EMPTY)).size == 0
    assert await read_all(store, "default", EMPTY) == b""


async def test_delete_removes_the_file_with_the_last_namespace(store, events):
    subscription = events.subscribe(['topic=="/content/delete"'])
    data = b"to be deleted"
    await write_blob(store, "a", "r", data)
    await write_blob(store, "b", "r", data)
    await store.delete("a", sha(data))
    with pytest.raises(NotFound):
        await store.info("a", sha(data))
    with pytest.raises(NotFound):
        await store.delete("a", sha(data))
    assert await read_all(store, "b", sha(data)) == data
    await store.delete("b", sha(data))
    assert blob_files(store) == []
    envelopes = []
    async for envelope in subscription:
        envelopes.append(envelope)
        if len(envelopes) == 2:
            break
    assert [(e.namespace, e.topic, e.event_type) for e in envelopes] == [
        ("a", "/content/delete", "containerd.events.ContentDelete"),
        ("b", "/content/delete", "containerd.events.ContentDelete"),
    ]
    # Written again after a delete: a fresh blob.
    await write_blob(store, "a", "r", data)
    assert await read_all(store, "a", sha(data)) == data


async def test_namespace_with_content_cannot_be_deleted(store, meta):
    await write_blob(store, "team", "r", b"x")
    with pytest.raises(FailedPrecondition, match="content"):
        await meta.namespaces.delete("team")
    await store.delete("team", sha(b"x"))
    await meta.namespaces.delete("team")


async def test_label_updates_by_field_mask(store):
    digest = await write_blob(store, "default", "r", b"labelled", labels={"a": "1", "b": "2"})

    async def update(labels: dict[str, str], paths: list[str]) -> dict[str, str]:
        updated = await store.update("default", ContentInfo(digest, 0, labels), paths)
        assert updated == await store.info("default", digest)
        return updated.labels

    assert await update({"c": "3"}, ["labels.c"]) == {"a": "1", "b": "2", "c": "3"}
    assert await update({}, ["labels.a"]) == {"b": "2", "c": "3"}
    assert await update({"b": ""}, ["labels.b"]) == {"c": "3"}
    assert await update({"x": "y"}, ["labels"]) == {"x": "y"}
    assert await update({"z": "1"}, []) == {"z": "1"}  # empty mask: replace the labels
    with pytest.raises(InvalidArgument, match='cannot update "size" field'):
        await update({}, ["size"])
    with pytest.raises(InvalidArgument, match="label key and value greater than maximum size"):
        await update({"big": "v" * 5000}, ["labels.big"])
    info = await store.info("default", digest)
    assert info.labels == {"z": "1"} and info.updated_at > info.created_at


async def test_list_filters(store):
    one = await write_blob(store, "default", "1", b"one", labels={"kind": "config"})
    two = await write_blob(store, "default", "2", b"two", labels={"kind": "layer"})
    assert {i.digest for i in await store.list("default")} == {one, two}
    assert [i.digest for i in await store.list("default", ['labels."kind"==layer'])] == [two]
    assert [i.digest for i in await store.list("default", [f"digest=={one}"])] == [one]
    assert {i.digest for i in await store.list("default", ["kind==x", "labels.kind"])} == {one, two}
    assert await store.list("default", ["size==3"]) == []  # size is never a filter field
    with pytest.raises(InvalidArgument, match="filters: parse error"):
        await store.list("default", ["labels."])


async def test_read_ranges(store):
    data = os.urandom(2 * MIB + 5)
    digest = await write_blob(store, "default", "r", data)
    chunks = [c async for c in store.read("default", digest)]
    assert [len(c) for c in chunks] == [MIB, MIB, 5]
    assert await read_all(store, "default", digest, 10, 20) == data[10:30]
    assert await read_all(store, "default", digest, MIB - 1, MIB + 2) == data[MIB - 1 : 2 * MIB + 1]
    assert await read_all(store, "default", digest, len(data) - 3, 100) == data[-3:]
    assert await read_all(store, "default", digest, len(data)) == b""
    with pytest.raises(OutOfRange, match=f"read past object length {len(data)} bytes"):
        await read_all(store, "default", digest, len(data) + 1)


async def test_invalid_input(store):
    for call in (
        store.info("default", "sha256:nothex"),
        store.delete("default", "md5:abc"),
        read_all(store, "default", "nope"),
    ):
        with pytest.raises(InvalidArgument, match="digest"):
            await call
    with pytest.raises(InvalidArgument, match="ref must not be empty"):
        async with store.writer("default", ""):
            pass
    with pytest.raises(InvalidArgument):
        async with store.writer("default", "r", expected="sha256:123"):
            pass
    # A failed open leaves the ref free.
    async with store.writer("default", "r"):
        pass


async def test_status_list_statuses_and_abort(store):
    async with store.writer("default", "layer-sha256:aa", total=100, expected=sha(b"x")) as writer:
        await writer.write(b"12345")
        status = await store.status("default", "layer-sha256:aa")
        assert (status.offset, status.total, status.expected) == (5, 100, sha(b"x"))
    async with store.writer("default", "config-sha256:bb") as writer:
        refs = [s.ref for s in await store.list_statuses("default")]
        assert refs == ["config-sha256:bb", "layer-sha256:aa"]
    assert [s.ref for s in await store.list_statuses("default", ["ref~=^layer-"])] == ["layer-sha256:aa"]
    assert [s.ref for s in await store.list_statuses("default", [""])] == refs
    assert await store.list_statuses("other") == []
    with pytest.raises(NotFound, match="reference nope: not found"):
        await store.status("default", "nope")
    with pytest.raises(NotFound):
        await store.abort("default", "nope")
    with pytest.raises(NotFound):
        await store.abort("other", "layer-sha256:aa")
    await store.abort("default", "layer-sha256:aa")
    assert [s.ref for s in await store.list_statuses("default")] == ["config-sha256:bb"]
    await store.abort("default", "config-sha256:bb")
    assert ingest_dirs(store) == []


async def test_leased_writes_record_their_resources(store, meta):
    lease = await meta.leases.create("default", "pull-1", {})
    data = b"leased content"
    async with store.writer("default", "ref-1", total=len(data), lease=lease.id) as writer:
        assert await meta.leases.list_resources("default", lease.id) == [LeaseResource("ref-1", "ingests")]
        await writer.write(data)
        await writer.commit(len(data))
    assert await meta.leases.list_resources("default", lease.id) == [LeaseResource(sha(data), "content")]
    # Content already there still joins the lease (containerd does the same).
    other = await meta.leases.create("default", "pull-2", {})
    with pytest.raises(AlreadyExists):
        async with store.writer("default", "ref-2", expected=sha(data), lease=other.id):
            pass
    assert await meta.leases.list_resources("default", other.id) == [LeaseResource(sha(data), "content")]
    # An aborted ingest leaves its lease.
    async with store.writer("default", "ref-3", lease=other.id) as writer:
        await writer.write(b"partial")
    await store.abort("default", "ref-3")
    assert await meta.leases.list_resources("default", other.id) == [LeaseResource(sha(data), "content")]
    # Deleting under the lease drops the reference.
    await store.delete("default", sha(data), lease=other.id)
    assert await meta.leases.list_resources("default", other.id) == []
    with pytest.raises(NotFound, match='lease "gone" does not exist'):
        async with store.writer("default", "ref-4", lease="gone"):
            pass


async def test_ingest_bytes_is_idempotent(store):
    manifest = b'{"schemaVersion": 2}'
    first = await store.ingest_bytes("default", "manifest", manifest, labels={"k": "v"})
    assert (first.digest, first.size, first.labels) == (sha(manifest), len(manifest), {"k": "v"})
    again = await store.ingest_bytes("default", "manifest", manifest, expected=sha(manifest))
    assert again == first
    adopted = await store.ingest_bytes("other", "manifest", manifest)
    assert adopted.size == len(manifest)
    with pytest.raises(FailedPrecondition):
        await store.ingest_bytes("default", "bad", b"data", expected=sha(b"other"))
    assert ingest_dirs(store) == []


async def test_open_sweeps_leftovers(tmp_path, meta, events):
    root = tmp_path / "content"
    store = ContentStore(root, meta.db, events)
    await store.open()
    torn = root / "ingest" / "torn"
    torn.mkdir()
    (torn / "data").write_bytes(b"no status file")
    committed = root / "ingest" / "committed"
    committed.mkdir()
    (committed / "status.json").write_text('{"ref": "r", "namespace": "default"}')
    reopened = ContentStore(root, meta.db, events)
    await reopened.open()
    assert ingest_dirs(reopened) == []


@pytest.mark.parametrize("delay", [0, 0.001, 0.01, 0.05])
async def test_cancellation_mid_write_or_commit_leaves_a_consistent_ingest(store, delay):
    data = os.urandom(8 * MIB)
    started = asyncio.Event()

    async def upload() -> None:
        async with store.writer("default", "big", total=len(data)) as writer:
            started.set()
            await writer.write(data)
            await writer.commit(len(data), sha(data))

    task = asyncio.create_task(upload())
    await started.wait()
    await asyncio.sleep(delay)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    # Whatever point the cancellation hit, the ref is free again once the thread work is over,
    # and what is on disk is either a committed blob or an ingest whose hash matches its data.
    async with store.writer("default", "big", total=len(data)) as writer:
        offset = writer.status().offset
        assert writer.digest() == sha(data[:offset])
        committed = await store.exists("default", sha(data))
        assert offset == 0 if committed else offset in (0, len(data))
        if committed:
            await writer.abort()  # the fresh ingest this writer opened
        else:
            await writer.write(data[offset:], offset)
            await writer.commit(len(data), sha(data))
    assert await read_all(store, "default", sha(data)) == data
    assert ingest_dirs(store) == []
