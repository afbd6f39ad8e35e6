"""Garbage collection through gRPC against a real daemon: image delete with sync, leases,
containers, namespaces, lease expiry, and a kill -9 in the middle of a collection."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import any_pb2, field_mask_pb2

from runtimed.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from runtimed.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from runtimed.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from runtimed.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from runtimed.api.containerd.services.namespaces.v1 import namespace_pb2, namespace_pb2_grpc
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from runtimed.api.containerd.types import descriptor_pb2
from runtimed.wire import LEASE_KEY, NAMESPACE_KEY

SNAPSHOTTER = "native"  # works without overlay support; the collector treats all alike
CONTENT_ROOT = "io.containerd.content.v1.content"
SNAPSHOTS_ROOT = f"io.containerd.snapshotter.v1.{SNAPSHOTTER}"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Api:
    """The stubs a test needs, every call with a namespace (and optionally a lease)."""

    def __init__(self, channel: grpc.Channel, namespace: str = "default", lease: str = "") -> None:
        self.channel = channel
        self.namespace = namespace
        self.lease = lease
        self.content = content_pb2_grpc.ContentStub(channel)
        self.snapshots = snapshots_pb2_grpc.SnapshotsStub(channel)
        self.leases = leases_pb2_grpc.LeasesStub(channel)
        self.images = images_pb2_grpc.ImagesStub(channel)
        self.containers = containers_pb2_grpc.ContainersStub(channel)
        self.namespaces = namespace_pb2_grpc.NamespacesStub(channel)

    def under(self, namespace: str | None = None, lease: str | None = None) -> Api:
        return Api(self.channel, namespace or self.namespace, self.lease if lease is None else lease)

    @property
    def md(self) -> list[tuple[str, str]]:
        headers = [(NAMESPACE_KEY, self.namespace)]
        return [*headers, (LEASE_KEY, self.lease)] if self.lease else headers

    def put(self, data: bytes, **labels: str) -> str:
        """Write a blob (one WRITE+COMMIT, as ctr does for small blobs)."""
        digest = sha(data)
        requests = iter(
            [
                content_pb2.WriteContentRequest(
                    action=content_pb2.STAT, ref=f"ref-{digest}", total=len(data)
                ),
                content_pb2.WriteContentRequest(
                    action=content_pb2.COMMIT, offset=0, data=data, total=len(data), labels=labels
                ),
            ]
        )
        try:
            list(self.content.Write(requests, metadata=self.md, timeout=30))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        return digest

    def label(self, digest: str, **labels: str) -> None:
        info = content_pb2.Info(digest=digest, labels=labels)
        mask = field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])
        self.content.Update(content_pb2.UpdateRequest(info=info, update_mask=mask), metadata=self.md)

    def digests(self) -> set[str]:
        return {
            info.digest
            for batch in self.content.List(content_pb2.ListContentRequest(), metadata=self.md)
            for info in batch.info
        }

    def prepare(self, key: str, parent: str = "") -> None:
        request = snapshots_pb2.PrepareSnapshotRequest(snapshotter=SNAPSHOTTER, key=key, parent=parent)
        self.snapshots.Prepare(request, metadata=self.md)

    def commit(self, name: str, key: str) -> None:
        request = snapshots_pb2.CommitSnapshotRequest(snapshotter=SNAPSHOTTER, name=name, key=key)
        self.snapshots.Commit(request, metadata=self.md)

    def chain(self, *names: str) -> None:
        """Committed snapshots names[0] <- names[1] <- ..., as an unpack makes them."""
        parent = ""
        for name in names:
            self.prepare(f"extract-{name}", parent)
            self.commit(name, f"extract-{name}")
            parent = name

    def snapshot_names(self) -> set[str]:
        request = snapshots_pb2.ListSnapshotsRequest(snapshotter=SNAPSHOTTER)
        return {info.name for batch in self.snapshots.List(request, metadata=self.md) for info in batch.info}

    def create_image(self, name: str, digest: str, size: int = 1) -> None:
        target = descriptor_pb2.Descriptor(media_type=MANIFEST, digest=digest, size=size)
        image = images_pb2.Image(name=name, target=target)
        self.images.Create(images_pb2.CreateImageRequest(image=image), metadata=self.md)

    def delete_image(self, name: str, sync: bool = True) -> None:
        self.images.Delete(images_pb2.DeleteImageRequest(name=name, sync=sync), metadata=self.md, timeout=60)

    def create_lease(self, lease_id: str, **labels: str) -> None:
        self.leases.Create(leases_pb2.CreateRequest(id=lease_id, labels=labels), metadata=self.md)

    def delete_lease(self, lease_id: str, sync: bool = True) -> None:
        self.leases.Delete(leases_pb2.DeleteRequest(id=lease_id, sync=sync), metadata=self.md, timeout=60)

    def lease_ids(self) -> set[str]:
        return {lease.id for lease in self.leases.List(leases_pb2.ListRequest(), metadata=self.md).leases}

    def collect(self) -> None:
        """Run a collection and wait for it: delete a throwaway lease with sync."""
        self.under(lease="").create_lease("gc-trigger")
        self.under(lease="").delete_lease("gc-trigger", sync=True)


@pytest.fixture
def api(daemon) -> Iterator[Api]:
    with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
        yield Api(channel)


def blob_files(daemon) -> set[str]:
    directory = daemon.root / CONTENT_ROOT / "blobs" / "sha256"
    return {"sha256:" + name for name in os.listdir(directory)} if directory.exists() else set()


def snapshot_dirs(daemon) -> set[str]:
    return set(os.listdir(daemon.root / SNAPSHOTS_ROOT / "snapshots"))


def make_image(api: Api, tag: str, top: str) -> dict[str, str]:
    """Blobs labelled as ctr's import and unpack label them, and the image record."""
    layer = api.put(f"layer of {tag}".encode())
    config = api.put(f"config of {tag}".encode(), **{f"containerd.io/gc.ref.snapshot.{SNAPSHOTTER}": top})
    manifest = api.put(
        f"manifest of {tag}".encode(),
        **{"containerd.io/gc.ref.content.config": config, "containerd.io/gc.ref.content.l.0": layer},
    )
    api.create_image(tag, manifest)
    return {"layer": layer, "config": config, "manifest": manifest}


def test_image_delete_with_sync_collects_what_only_it_referenced(api, daemon):
    api.chain("base", "mid", "top")
    api.chain("other")
    image = make_image(api, "docker.io/library/app:1", "top")
    # Shared with a second image that stays.
    keep = make_image(api, "docker.io/library/keep:1", "base")
    stray = api.put(b"stray, referenced by nothing")
    api.collect()
    assert stray not in api.digests() and stray not in blob_files(daemon)
    assert "other" not in api.snapshot_names()
    assert set(image.values()) | set(keep.values()) <= api.digests()

    api.delete_image("docker.io/library/app:1")
    assert api.digests() == set(keep.values())
    assert blob_files(daemon) == set(keep.values())
    assert api.snapshot_names() == {"base"}  # the kept image's config label holds it
    assert len(snapshot_dirs(daemon)) == 1

    api.delete_image("docker.io/library/keep:1")
    assert api.digests() == set() and blob_files(daemon) == set() and api.snapshot_names() == set()
    assert snapshot_dirs(daemon) == set()


def test_image_delete_without_sync_collects_shortly_after(api, daemon):
    image = make_image(api, "app:1", "")
    api.delete_image("app:1", sync=False)
    deadline = time.monotonic() + 10
    while api.digests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.digests() == set() and not set(image.values()) & blob_files(daemon)
    assert "garbage collected" in daemon.log()


def test_gc_root_and_label_references(api):
    rooted = api.put(b"rooted", **{"containerd.io/gc.root": "2026-11-27T00:00:00Z"})
    child = api.put(b"child")
    api.label(rooted, **{"containerd.io/gc.ref.content.child": child})
    api.chain("s1", "s2")
    request = snapshots_pb2.UpdateSnapshotRequest(
        snapshotter=SNAPSHOTTER,
        info=snapshots_pb2.Info(name="s2", labels={"containerd.io/gc.root": "yes"}),
        update_mask=field_mask_pb2.FieldMask(paths=["labels.containerd.io/gc.root"]),
    )
    api.snapshots.Update(request, metadata=api.md)
    api.collect()
    assert api.digests() == {rooted, child}
    assert api.snapshot_names() == {"s1", "s2"}


def test_a_lease_protects_content_and_snapshots_until_deleted(api, daemon):
    api.create_lease("pull-1", **{"containerd.io/gc.expire": "2099-01-01T00:00:00Z"})
    leased = api.under(lease="pull-1")
    blob = leased.put(b"written under the lease")
    leased.chain("layer-1", "layer-2")  # committed names are leased, extract- keys dropped
    listed = leased.leases.ListResources(leases_pb2.ListResourcesRequest(id="pull-1"), metadata=api.md)
    assert {(r.type, r.id) for r in listed.resources} == {
        ("content", blob),
        (f"snapshots/{SNAPSHOTTER}", "layer-1"),
        (f"snapshots/{SNAPSHOTTER}", "layer-2"),
    }
    api.collect()
    assert blob in api.digests() and blob in blob_files(daemon)
    assert api.snapshot_names() == {"layer-1", "layer-2"}

    api.delete_lease("pull-1")  # sync: collected before the call returns
    assert api.digests() == set() and blob not in blob_files(daemon)
    assert api.snapshot_names() == set()


def test_an_expired_lease_is_removed_with_what_only_it_held(api):
    api.create_lease("old", **{"containerd.io/gc.expire": "2001-01-01T00:00:00Z"})
    api.create_lease("young", **{"containerd.io/gc.expire": "2099-01-01T00:00:00Z"})
    old = api.under(lease="old").put(b"old")
    young = api.under(lease="young").put(b"young")
    api.collect()
    assert api.lease_ids() == {"young"}
    assert api.digests() == {young} and old not in api.digests()


def test_a_container_keeps_its_snapshot_and_its_parents(api):
    api.chain("img-base", "img-top")
    api.prepare("ctr-1", "img-top")
    spec = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Spec", value=b"{}")
    container = containers_pb2.Container(
        id="ctr-1",
        image="docker.io/library/gone:1",  # no such image: a container's image is no root anyway
        runtime=containers_pb2.Container.Runtime(name="io.containerd.runc.v2"),
        spec=spec,
        snapshotter=SNAPSHOTTER,
        snapshot_key="ctr-1",
    )
    api.containers.Create(containers_pb2.CreateContainerRequest(container=container), metadata=api.md)
    api.collect()
    assert api.snapshot_names() == {"img-base", "img-top", "ctr-1"}

    # ctr containers rm: Snapshots.Remove then Containers.Delete, whose event triggers a collection.
    remove = snapshots_pb2.RemoveSnapshotRequest(snapshotter=SNAPSHOTTER, key="ctr-1")
    api.snapshots.Remove(remove, metadata=api.md)
    api.containers.Delete(containers_pb2.DeleteContainerRequest(id="ctr-1"), metadata=api.md)
    deadline = time.monotonic() + 10
    while api.snapshot_names() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.snapshot_names() == set()


def test_namespaces_are_isolated(api, daemon):
    a, b = api.under("team-a"), api.under("team-b")
    shared = a.put(b"the same bytes in two namespaces")
    assert b.put(b"the same bytes in two namespaces") == shared
    a.create_image("app:1", shared)
    b.create_image("app:1", shared)
    # Deleting in B (record and image) leaves A's record and the one blob file alone.
    b.content.Delete(content_pb2.DeleteContentRequest(digest=shared), metadata=b.md)
    b.delete_image("app:1")
    assert b.digests() == set()
    assert a.digests() == {shared} and shared in blob_files(daemon)
    # A's own unreferenced content goes, B's image is no root for it.
    b.put(b"only b")
    b.create_image("b-only:1", sha(b"only b"))
    a.put(b"only b")
    a.collect()
    assert a.digests() == {shared} and b.digests() == {sha(b"only b")}
    assert sha(b"only b") in blob_files(daemon)
    a.delete_image("app:1")
    assert a.digests() == set() and blob_files(daemon) == {sha(b"only b")}


def test_a_namespace_with_snapshots_cannot_be_deleted(api):
    ns = api.under("busy")
    ns.prepare("work")
    with pytest.raises(grpc.RpcError) as info:
        api.namespaces.Delete(namespace_pb2.DeleteNamespaceRequest(name="busy"), metadata=api.md)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == (
        'namespace "busy" must be empty, but it still has snapshots on "native" snapshotter'
        ": failed precondition"
    )
    ns.collect()  # nothing holds it
    assert ns.snapshot_names() == set()
    api.namespaces.Delete(namespace_pb2.DeleteNamespaceRequest(name="busy"), metadata=api.md)


def test_restart_reclaims_orphans_and_stale_ingests(daemon, daemon_factory):
    with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
        api = Api(channel)
        kept = api.put(b"kept", **{"containerd.io/gc.root": "1"})
        # An ingest left half-written by a client that went away.
        requests = iter(
            [
                content_pb2.WriteContentRequest(action=content_pb2.STAT, ref="abandoned", total=10),
                content_pb2.WriteContentRequest(action=content_pb2.WRITE, offset=0, data=b"12345"),
            ]
        )
        list(api.content.Write(requests, metadata=api.md, timeout=30))
    daemon.kill()
    blobs = daemon.root / CONTENT_ROOT / "blobs" / "sha256"
    orphan = sha(b"left by a crash between a commit's rename and its row")
    (blobs / orphan[7:]).write_bytes(b"left by a crash between a commit's rename and its row")
    for status_file in (daemon.root / CONTENT_ROOT / "ingest").glob("*/status.json"):
        record = json.loads(status_file.read_text())
        record["started_at"] = record["updated_at"] = time.time_ns() - 25 * 3600 * 10**9
        status_file.write_text(json.dumps(record))
    daemon.start()
    with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
        api = Api(channel)
        # The start-up collection ran before the daemon served.
        assert blob_files(daemon) == {kept} and api.digests() == {kept}
        statuses = api.content.ListStatuses(content_pb2.ListStatusesRequest(), metadata=api.md)
        assert list(statuses.statuses) == []


def test_kill_during_collection_leaves_a_consistent_store(daemon):
    """kill -9 at a random point of a collection that removes many blobs and snapshots; after the
    restart no record points at a missing blob or snapshot directory, and no orphan file is left."""
    rng = random.Random(1234)
    kept: set[str] = set()
    for attempt in range(4):
        with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
            api = Api(channel)
            kept.add(api.put(f"kept {attempt}".encode(), **{"containerd.io/gc.root": "1"}))
            manifest_labels = {}
            for i in range(300):
                manifest_labels[f"containerd.io/gc.ref.content.l.{i}"] = api.put(f"{attempt}-{i}".encode())
            for i in range(30):
                api.chain(f"a{attempt}-{i}-base", f"a{attempt}-{i}-top")
            manifest = api.put(f"manifest {attempt}".encode(), **manifest_labels)
            api.create_image("doomed", manifest)

            def delete(api: Api = api) -> None:
                with contextlib.suppress(grpc.RpcError):  # the daemon dies under it
                    api.delete_image("doomed")

            caller = threading.Thread(target=delete)
            caller.start()
            time.sleep(rng.uniform(0.0, 0.12))  # a collection here takes ~0.1 s
            daemon.kill()
            caller.join(30)
        daemon.start()
        with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
            api = Api(channel)
            digests = api.digests()
            files = blob_files(daemon)
            assert digests <= files, "a content record points at a missing blob"
            assert files <= digests, "an orphan blob file survived the restart"
            assert kept <= digests
            for digest in digests:  # every record reads back
                request = content_pb2.ReadContentRequest(digest=digest)
                assert b"".join(r.data for r in api.content.Read(request, metadata=api.md))
            names = api.snapshot_names()
            assert len(snapshot_dirs(daemon)) == len(names)
            # The image is gone or not; either way a last collection finishes the job.
            images = api.images.List(images_pb2.ListImagesRequest(), metadata=api.md).images
            if "doomed" in {image.name for image in images}:
                api.delete_image("doomed")
            else:
                api.collect()
            assert api.digests() == kept and blob_files(daemon) == kept
            assert api.snapshot_names() == set() and snapshot_dirs(daemon) == set()
