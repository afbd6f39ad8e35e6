"""The SQLite metadata store: transactions, tenant isolation, validation, events."""

from __future__ import annotations

import sqlite3

import pytest

from runtimed.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from runtimed.events.exchange import Exchange
from runtimed.metadata.plugin import open_metadata
from runtimed.types import AnyValue, Container, Descriptor, Image, Namespace, RuntimeInfo

SPEC = AnyValue("types.containerd.io/opencontainers/runtime-spec/1/Spec", b'{"ociVersion":"1.0.2"}')
DIGEST = "sha256:" + "a" * 64


def container(cid: str = "c1", **kwargs) -> Container:
    return Container(id=cid, runtime=RuntimeInfo("io.containerd.runc.v2"), spec=SPEC, **kwargs)


def image(name: str = "docker.io/library/busybox:latest", **kwargs) -> Image:
    target = Descriptor("application/vnd.oci.image.manifest.v1+json", DIGEST, 1234)
    return Image(name=name, target=target, **kwargs)


@pytest.fixture
async def events():
    return Exchange()


@pytest.fixture
async def meta(tmp_path, events):
    store = await open_metadata(tmp_path / "meta.db", events)
    yield store
    await store.close()


async def test_create_get_list_delete_container(meta):
    created = await meta.containers.create("default", container(labels={"app": "web"}))
    assert created.created_at > 0 and created.updated_at == created.created_at
    got = await meta.containers.get("default", "c1")
    assert got.spec == SPEC and got.labels == {"app": "web"}
    assert [c.id for c in await meta.containers.list("default")] == ["c1"]
    await meta.containers.delete("default", "c1")
    with pytest.raises(NotFound, match='container "c1": not found'):
        await meta.containers.get("default", "c1")


async def test_first_write_creates_the_namespace(meta):
    assert await meta.namespaces.list() == []
    await meta.containers.create("team-a", container())
    assert [n.name for n in await meta.namespaces.list()] == ["team-a"]


async def test_namespaces_are_the_tenant_boundary(meta):
    await meta.containers.create("a", container("same"))
    await meta.containers.create("b", container("same", image="other"))
    await meta.images.create("a", image())
    assert [c.image for c in await meta.containers.list("b")] == ["other"]
    assert await meta.images.list("b") == []
    with pytest.raises(NotFound):
        await meta.images.get("b", image().name)
    await meta.containers.delete("a", "same")
    assert (await meta.containers.get("b", "same")).image == "other"


async def test_duplicate_and_invalid_containers(meta):
    await meta.containers.create("default", container())
    with pytest.raises(AlreadyExists, match='container "c1": already exists'):
        await meta.containers.create("default", container())
    with pytest.raises(InvalidArgument, match="container id"):
        await meta.containers.create("default", container("bad id!"))
    with pytest.raises(InvalidArgument, match="runtime.name"):
        await meta.containers.create("default", Container(id="c2", runtime=RuntimeInfo(""), spec=SPEC))
    with pytest.raises(InvalidArgument, match="spec"):
        await meta.containers.create("default", Container(id="c2", runtime=RuntimeInfo("r")))
    with pytest.raises(InvalidArgument, match="snapshotter"):
        await meta.containers.create("default", container("c3", snapshot_key="k"))
    assert [c.id for c in await meta.containers.list("default")] == ["c1"]


async def test_container_update_masks(meta):
    await meta.containers.create("default", container(labels={"a": "1", "b": "2"}))
    updated = await meta.containers.update("default", container(labels={"a": "9"}), ["labels.a"])
    assert updated.labels == {"a": "9", "b": "2"}
    updated = await meta.containers.update("default", container(labels={}), ["labels.b"])
    assert updated.labels == {"a": "9"}
    updated = await meta.containers.update("default", container(image="new"), ["image"])
    assert updated.image == "new" and updated.labels == {"a": "9"}
    with pytest.raises(InvalidArgument, match='cannot update "runtime"'):
        await meta.containers.update("default", container(), ["runtime"])
    other_runtime = Container(id="c1", runtime=RuntimeInfo("other"), spec=SPEC)
    with pytest.raises(InvalidArgument, match="immutable"):
        await meta.containers.update("default", other_runtime, [])
    # A full replace (empty mask) replaces labels, image and spec.
    replaced = await meta.containers.update("default", container(labels={"z": "1"}), [])
    assert replaced.labels == {"z": "1"} and replaced.image == ""
    assert replaced.updated_at > replaced.created_at


async def test_failed_transaction_leaves_nothing(meta):
    """A write that fails half way is rolled back whole."""

    def half(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO namespaces(name, labels, created_at, updated_at) VALUES ('half', '{}', 1, 1)"
        )
        raise InvalidArgument("boom")

    with pytest.raises(InvalidArgument):
        await meta.db.write(half)
    assert await meta.namespaces.list() == []


async def test_failed_update_changes_nothing(meta):
    await meta.images.create("default", image(labels={"keep": "me"}))
    bad = image(labels={"x": "y"})
    bad.target = Descriptor("", DIGEST, 1)
    with pytest.raises(InvalidArgument, match="media_type"):
        await meta.images.update("default", bad, ["labels.x", "target"])
    assert (await meta.images.get("default", bad.name)).labels == {"keep": "me"}


async def test_image_validation_and_update(meta):
    with pytest.raises(InvalidArgument, match="target.digest"):
        await meta.images.create("default", Image("x", Descriptor("m", "sha256:nothex", 1)))
    with pytest.raises(InvalidArgument, match="size"):
        await meta.images.create("default", Image("x", Descriptor("m", DIGEST, 0)))
    with pytest.raises(InvalidArgument, match="empty"):
        await meta.images.create("default", Image("", Descriptor("m", DIGEST, 1)))
    await meta.images.create("default", image())
    new_target = Descriptor("application/vnd.oci.image.index.v1+json", "sha256:" + "b" * 64, 99)
    updated = await meta.images.update("default", Image(image().name, new_target), ["target"])
    assert updated.target == new_target
    with pytest.raises(NotFound, match='image "nope": not found'):
        await meta.images.update("default", Image("nope", new_target), ["target"])


async def test_namespace_lifecycle_and_non_empty_delete(meta):
    await meta.namespaces.create(Namespace("ns1", {"a": "1"}))
    with pytest.raises(AlreadyExists):
        await meta.namespaces.create(Namespace("ns1"))
    updated = await meta.namespaces.update(Namespace("ns1", {"b": "2"}), ["labels.b"])
    assert updated.labels == {"a": "1", "b": "2"}
    await meta.images.create("ns1", image())
    with pytest.raises(FailedPrecondition, match='"ns1" must be empty, but it still has images'):
        await meta.namespaces.delete("ns1")
    await meta.images.delete("ns1", image().name)
    await meta.namespaces.delete("ns1")
    with pytest.raises(NotFound):
        await meta.namespaces.get("ns1")


async def test_filters_on_list(meta):
    await meta.containers.create("default", container("web1", labels={"tier": "web"}, image="nginx"))
    await meta.containers.create("default", container("db1", labels={"tier": "db"}, image="postgres"))
    await meta.containers.create("default", container("web2", image="nginx"))

    async def ids(*exprs):
        return [c.id for c in await meta.containers.list("default", list(exprs))]

    assert await ids("labels.tier==web") == ["web1"]
    assert await ids("image==nginx") == ["web1", "web2"]
    assert await ids("labels.tier") == ["db1", "web1"]
    assert await ids("id~=^web", "id==db1") == ["db1", "web1", "web2"]
    assert await ids("image==nginx,labels.tier==web") == ["web1"]
    assert await ids("") == ["db1", "web1", "web2"]
    with pytest.raises(InvalidArgument):
        await meta.containers.list("default", ["image=="])


async def test_leases_and_resources(meta):
    lease = await meta.leases.create("default", "", {"containerd.io/gc.expire": "2030-01-01T00:00:00Z"})
    assert lease.id
    with pytest.raises(AlreadyExists):
        await meta.leases.create("default", lease.id, {})
    from runtimed.types import LeaseResource

    await meta.leases.add_resource("default", lease.id, LeaseResource(DIGEST, "content"))
    await meta.leases.add_resource("default", lease.id, LeaseResource("k1", "snapshots/overlayfs"))
    with pytest.raises(InvalidArgument):
        await meta.leases.add_resource("default", lease.id, LeaseResource("x", "bogus"))
    assert len(await meta.leases.list_resources("default", lease.id)) == 2
    assert await meta.leases.list("other") == []
    await meta.leases.delete("default", lease.id)
    with pytest.raises(NotFound):
        await meta.leases.list_resources("default", lease.id)


async def test_events_follow_commits(meta, events):
    subscription = events.subscribe(["topic~=/containers/"])
    stream = subscription.__aiter__()
    await meta.containers.create("default", container())
    with pytest.raises(AlreadyExists):
        await meta.containers.create("default", container())
    await meta.containers.delete("default", "c1")
    first = await stream.__anext__()
    second = await stream.__anext__()
    assert (first.topic, second.topic) == ("/containers/create", "/containers/delete")
    assert first.namespace == "default"
    assert first.event_type == "containerd.events.ContainerCreate"


async def test_store_survives_reopen(tmp_path, events):
    store = await open_metadata(tmp_path / "meta.db", events)
    await store.containers.create("default", container())
    await store.close()
    store = await open_metadata(tmp_path / "meta.db", events)
    try:
        assert (await store.containers.get("default", "c1")).spec == SPEC
    finally:
        await store.close()
