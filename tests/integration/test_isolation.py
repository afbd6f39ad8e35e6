"""Namespaces are the tenant boundary: namespace B cannot see, get, update, delete or use anything
namespace A has (containers, images, leases, content and its labels, snapshots, tasks), the same
ids live independently in both, and A cannot be deleted while it holds resources."""

from __future__ import annotations

import hashlib
import json
import os

import grpc
import pytest
from fixtures.tasks import RUNC, SNAPSHOTTER, TaskRig, reap_leftovers, unique_namespace
from google.protobuf import any_pb2, field_mask_pb2

from runtimed.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from runtimed.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from runtimed.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from runtimed.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from runtimed.api.containerd.services.namespaces.v1 import namespace_pb2, namespace_pb2_grpc
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from runtimed.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from runtimed.api.containerd.types import descriptor_pb2
from runtimed.wire import NAMESPACE_KEY

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, mounts)"),
]

BLOB = b"tenant A's secret blob"
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


class Stubs:
    def __init__(self, channel: grpc.Channel, namespace: str) -> None:
        self.md = [(NAMESPACE_KEY, namespace)]
        self.containers = containers_pb2_grpc.ContainersStub(channel)
        self.content = content_pb2_grpc.ContentStub(channel)
        self.images = images_pb2_grpc.ImagesStub(channel)
        self.leases = leases_pb2_grpc.LeasesStub(channel)
        self.namespaces = namespace_pb2_grpc.NamespacesStub(channel)
        self.snapshots = snapshots_pb2_grpc.SnapshotsStub(channel)
        self.tasks = tasks_pb2_grpc.TasksStub(channel)


def test_namespace_b_cannot_touch_namespace_a(daemon, tmp_path):
    ns_a, ns_b = unique_namespace("isoa"), unique_namespace("isob")
    rig = TaskRig(daemon.address, ns_a, tmp_path)
    channel = grpc.insecure_channel(f"unix://{daemon.address}")
    a, b = Stubs(channel, ns_a), Stubs(channel, ns_b)
    try:
        # -- namespace A: a running task, containers, an image, a lease, a labelled blob ------
        rig.container("only-a", ["sleep", "300"])
        rig.create_task("only-a")
        rig.start("only-a")
        rig.container("shared", ["true"])
        a.containers.Update(
            containers_pb2.UpdateContainerRequest(
                container=containers_pb2.Container(id="shared", labels={"owner": "a"}),
                update_mask=field_mask_pb2.FieldMask(paths=["labels"]),
            ),
            metadata=a.md,
        )
        write = content_pb2.WriteContentRequest(
            action=content_pb2.COMMIT,
            ref="blob-a",
            data=BLOB,
            total=len(BLOB),
            expected=DIGEST,
            labels={"secret": "a", "containerd.io/gc.root": "x"},
        )
        list(a.content.Write(iter([write]), metadata=a.md))
        target = descriptor_pb2.Descriptor(
            media_type="application/octet-stream", digest=DIGEST, size=len(BLOB)
        )
        a.images.Create(
            images_pb2.CreateImageRequest(image=images_pb2.Image(name="img-a", target=target)), metadata=a.md
        )
        a.leases.Create(leases_pb2.CreateRequest(id="lease-a", labels={"owner": "a"}), metadata=a.md)

        # -- B sees none of it --------------------------------------------------------------------
        assert not b.containers.List(containers_pb2.ListContainersRequest(), metadata=b.md).containers
        assert not b.images.List(images_pb2.ListImagesRequest(), metadata=b.md).images
        assert not b.leases.List(leases_pb2.ListRequest(), metadata=b.md).leases
        assert not [
            i for r in b.content.List(content_pb2.ListContentRequest(), metadata=b.md) for i in r.info
        ]
        assert not b.content.ListStatuses(content_pb2.ListStatusesRequest(), metadata=b.md).statuses
        listing = b.snapshots.List(snapshots_pb2.ListSnapshotsRequest(snapshotter=SNAPSHOTTER), metadata=b.md)
        assert not [i for r in listing for i in r.info]
        assert not b.tasks.List(tasks_pb2.ListTasksRequest(), metadata=b.md).tasks
        assert not b.tasks.Metrics(tasks_pb2.MetricsRequest(), metadata=b.md).metrics

        # -- ... and cannot get, update, delete or use it ----------------------------------------
        nf = grpc.StatusCode.NOT_FOUND
        c = containers_pb2
        assert code_of(b.containers.Get, c.GetContainerRequest(id="only-a"), metadata=b.md) == nf
        update = c.UpdateContainerRequest(
            container=c.Container(id="only-a", labels={"owner": "b"}),
            update_mask=field_mask_pb2.FieldMask(paths=["labels"]),
        )
        assert code_of(b.containers.Update, update, metadata=b.md) == nf
        assert code_of(b.containers.Delete, c.DeleteContainerRequest(id="only-a"), metadata=b.md) == nf

        i = images_pb2
        assert code_of(b.images.Get, i.GetImageRequest(name="img-a"), metadata=b.md) == nf
        image_update = i.UpdateImageRequest(image=i.Image(name="img-a", target=target, labels={"x": "b"}))
        assert code_of(b.images.Update, image_update, metadata=b.md) == nf
        assert code_of(b.images.Delete, i.DeleteImageRequest(name="img-a"), metadata=b.md) == nf

        le = leases_pb2
        assert code_of(b.leases.Delete, le.DeleteRequest(id="lease-a"), metadata=b.md) == nf
        assert code_of(b.leases.ListResources, le.ListResourcesRequest(id="lease-a"), metadata=b.md) == nf
        resource = le.Resource(id=DIGEST, type="content")
        assert (
            code_of(
                b.leases.AddResource, le.AddResourceRequest(id="lease-a", resource=resource), metadata=b.md
            )
            == nf
        )

        co = content_pb2
        assert code_of(b.content.Info, co.InfoRequest(digest=DIGEST), metadata=b.md) == nf
        assert code_of(b.content.Read, co.ReadContentRequest(digest=DIGEST), metadata=b.md) == nf
        content_update = co.UpdateRequest(
            info=co.Info(digest=DIGEST, labels={"secret": "b"}),
            update_mask=field_mask_pb2.FieldMask(paths=["labels.secret"]),
        )
        assert code_of(b.content.Update, content_update, metadata=b.md) == nf
        assert code_of(b.content.Delete, co.DeleteContentRequest(digest=DIGEST), metadata=b.md) == nf
        assert code_of(b.content.Status, co.StatusRequest(ref="blob-a"), metadata=b.md) == nf

        s = snapshots_pb2
        for key in ("only-a", "busybox-base"):
            assert (
                code_of(
                    b.snapshots.Stat, s.StatSnapshotRequest(snapshotter=SNAPSHOTTER, key=key), metadata=b.md
                )
                == nf
            )
            assert (
                code_of(b.snapshots.Mounts, s.MountsRequest(snapshotter=SNAPSHOTTER, key=key), metadata=b.md)
                == nf
            )
            assert (
                code_of(
                    b.snapshots.Remove,
                    s.RemoveSnapshotRequest(snapshotter=SNAPSHOTTER, key=key),
                    metadata=b.md,
                )
                == nf
            )
        # A's committed snapshot cannot be B's parent.
        prepare = s.PrepareSnapshotRequest(snapshotter=SNAPSHOTTER, key="steal", parent="busybox-base")
        assert code_of(b.snapshots.Prepare, prepare, metadata=b.md) == nf

        t = tasks_pb2
        assert code_of(b.tasks.Get, t.GetRequest(container_id="only-a"), metadata=b.md) == nf
        assert code_of(b.tasks.Kill, t.KillRequest(container_id="only-a", signal=9), metadata=b.md) == nf
        assert code_of(b.tasks.ListPids, t.ListPidsRequest(container_id="only-a"), metadata=b.md) == nf
        assert code_of(b.tasks.Pause, t.PauseTaskRequest(container_id="only-a"), metadata=b.md) == nf
        exec_request = t.ExecProcessRequest(
            container_id="only-a",
            exec_id="e1",
            spec=any_pb2.Any(
                type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                value=json.dumps({"args": ["true"], "cwd": "/"}).encode(),
            ),
        )
        assert code_of(b.tasks.Exec, exec_request, metadata=b.md) == nf
        assert code_of(b.tasks.Delete, t.DeleteTaskRequest(container_id="only-a"), metadata=b.md) == nf
        assert code_of(b.tasks.Create, t.CreateTaskRequest(container_id="only-a"), metadata=b.md) == nf

        # -- the same ids in B are B's own --------------------------------------------------------
        spec = any_pb2.Any(type_url=SPEC_URL, value=json.dumps(rig.spec("shared", ["true"])).encode())
        b.containers.Create(
            c.CreateContainerRequest(
                container=c.Container(
                    id="shared", labels={"owner": "b"}, runtime=c.Container.Runtime(name=RUNC), spec=spec
                )
            ),
            metadata=b.md,
        )
        b.leases.Create(le.CreateRequest(id="lease-a", labels={"owner": "b"}), metadata=b.md)
        b.images.Create(
            i.CreateImageRequest(image=i.Image(name="img-a", target=target, labels={"o": "b"})), metadata=b.md
        )
        # The same blob written in B: B's own record and labels (the bytes are shared on disk).
        write_b = co.WriteContentRequest(
            action=co.COMMIT,
            ref="blob-b",
            data=BLOB,
            total=len(BLOB),
            expected=DIGEST,
            labels={"secret": "b"},
        )
        list(b.content.Write(iter([write_b]), metadata=b.md))
        assert b.content.Info(co.InfoRequest(digest=DIGEST), metadata=b.md).info.labels["secret"] == "b"
        assert a.content.Info(co.InfoRequest(digest=DIGEST), metadata=a.md).info.labels["secret"] == "a"
        got = b.containers.Get(c.GetContainerRequest(id="shared"), metadata=b.md).container
        assert got.labels["owner"] == "b"
        got = a.containers.Get(c.GetContainerRequest(id="shared"), metadata=a.md).container
        assert got.labels["owner"] == "a" and got.snapshot_key == "shared"
        b.containers.Delete(c.DeleteContainerRequest(id="shared"), metadata=b.md)
        b.leases.Delete(le.DeleteRequest(id="lease-a"), metadata=b.md)
        b.images.Delete(i.DeleteImageRequest(name="img-a"), metadata=b.md)
        b.content.Delete(co.DeleteContentRequest(digest=DIGEST), metadata=b.md)
        # Deleting B's copies left A's untouched.
        assert a.containers.Get(c.GetContainerRequest(id="shared"), metadata=a.md).container.id == "shared"
        assert a.leases.List(le.ListRequest(filters=["id==lease-a"]), metadata=a.md).leases
        assert a.images.Get(i.GetImageRequest(name="img-a"), metadata=a.md).image.name == "img-a"
        assert a.content.Info(co.InfoRequest(digest=DIGEST), metadata=a.md).info.digest == DIGEST
        assert rig.get("only-a").status == 2  # RUNNING: B's attempts did nothing to A's task

        # -- A cannot be deleted while it holds resources; empty B can ----------------------------
        n = namespace_pb2
        failed = code_of(b.namespaces.Delete, n.DeleteNamespaceRequest(name=ns_a))
        assert failed == grpc.StatusCode.FAILED_PRECONDITION
        assert b.namespaces.Get(n.GetNamespaceRequest(name=ns_a)).namespace.name == ns_a
        b.namespaces.Delete(n.DeleteNamespaceRequest(name=ns_b))
    finally:
        try:
            rig.kill("only-a")
            rig.wait("only-a", timeout=15)
            rig.delete_task("only-a")
        except grpc.RpcError:
            pass
        channel.close()
        rig.close()
        leftovers = reap_leftovers(daemon.state, [ns_a])
    assert not leftovers, f"test left {leftovers}"
