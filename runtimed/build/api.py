"""The daemon's services as the builder uses them: one namespace, one build lease, plain values.

Every call that creates something (snapshots, content, diffs) carries the build's lease, so the
garbage collector cannot take a half-built image's parts; the lease is deleted when the build
ends, which leaves only what an image record or a cache record (runtimed.build.cache) references.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc

from runtimed.types import Descriptor, Mount
from runtimed.wire import LEASE_KEY, NAMESPACE_KEY

SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
LEASE_EXPIRY = 24 * 3600  # a build whose client died is collectable after this


def not_found(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.NOT_FOUND


def already_exists(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.ALREADY_EXISTS


class Daemon:
    def __init__(self, channel: grpc.Channel, namespace: str, timeout: float) -> None:
        from runtimed.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
        from runtimed.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
        from runtimed.api.containerd.services.diff.v1 import diff_pb2, diff_pb2_grpc
        from runtimed.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
        from runtimed.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
        from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
        from runtimed.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
        from runtimed.api.containerd.types import mount_pb2
        from runtimed.api.runtimed.services.transfer.v1 import transfer_pb2, transfer_pb2_grpc

        self.namespace = namespace
        self.timeout = timeout
        self.md: list[tuple[str, str]] = [(NAMESPACE_KEY, namespace)]
        self.leased = self.md
        self.lease_id = ""
        self.content_pb, self.content = content_pb2, content_pb2_grpc.ContentStub(channel)
        self.snapshots_pb, self.snapshots = snapshots_pb2, snapshots_pb2_grpc.SnapshotsStub(channel)
        self.diff_pb, self.diff_stub = diff_pb2, diff_pb2_grpc.DiffStub(channel)
        self.leases_pb, self.leases = leases_pb2, leases_pb2_grpc.LeasesStub(channel)
        self.containers_pb, self.containers = containers_pb2, containers_pb2_grpc.ContainersStub(channel)
        self.tasks_pb, self.tasks = tasks_pb2, tasks_pb2_grpc.TasksStub(channel)
        self.images_pb, self.images = images_pb2, images_pb2_grpc.ImagesStub(channel)
        self.transfer_pb, self.transfer = transfer_pb2, transfer_pb2_grpc.TransferStub(channel)
        self.mount_pb = mount_pb2

    def _call(self, method: Any, request: Any, *, leased: bool = False, timeout: float | None = -1) -> Any:
        return method(
            request,
            metadata=self.leased if leased else self.md,
            timeout=self.timeout if timeout == -1 else timeout,
        )

    # -- leases -------------------------------------------------------------------------------------

    def create_lease(self) -> str:
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + LEASE_EXPIRY))
        labels = {"containerd.io/gc.expire": expires, "runtimed.build": "1"}
        lease = self._call(self.leases.Create, self.leases_pb.CreateRequest(labels=labels)).lease
        self.lease_id = lease.id
        self.leased = [*self.md, (LEASE_KEY, lease.id)]
        return lease.id

    def delete_lease(self, *, sync: bool = False) -> None:
        if self.lease_id:
            request = self.leases_pb.DeleteRequest(id=self.lease_id, sync=sync)
            self._call(self.leases.Delete, request, timeout=120)
            self.lease_id = ""
            self.leased = self.md

    def lease_content(self, digest: str) -> None:
        if self.lease_id:
            resource = self.leases_pb.Resource(id=digest, type="content")
            self._call(
                self.leases.AddResource,
                self.leases_pb.AddResourceRequest(id=self.lease_id, resource=resource),
            )

    def collect_garbage(self) -> None:
        """A synchronous garbage collection (a throw-away lease deleted with sync)."""
        lease = self._call(self.leases.Create, self.leases_pb.CreateRequest()).lease
        self._call(self.leases.Delete, self.leases_pb.DeleteRequest(id=lease.id, sync=True), timeout=300)

    # -- content ------------------------------------------------------------------------------------

    def read(self, digest: str) -> bytes:
        request = self.content_pb.ReadContentRequest(digest=digest)
        return b"".join(chunk.data for chunk in self._call(self.content.Read, request))

    def read_json(self, digest: str) -> dict[str, Any]:
        return json.loads(self.read(digest))

    def info(self, digest: str) -> Any | None:
        try:
            return self._call(self.content.Info, self.content_pb.InfoRequest(digest=digest)).info
        except grpc.RpcError as exc:
            if not_found(exc):
                return None
            raise

    def write(self, data: bytes, digest: str, labels: dict[str, str]) -> None:
        """Store a blob (under the lease) with labels; an existing blob gets the labels added."""
        self.lease_content(digest)
        if self.info(digest) is None:
            request = self.content_pb.WriteContentRequest(
                action=self.content_pb.COMMIT,
                ref=f"build-{digest}",
                total=len(data),
                expected=digest,
                data=data,
                labels=labels,
            )
            try:
                for _ in self._call(self.content.Write, iter([request]), leased=True):
                    pass
                return
            except grpc.RpcError as exc:
                if not already_exists(exc):
                    raise
        self.set_labels(digest, labels)

    def set_labels(self, digest: str, labels: dict[str, str]) -> None:
        from google.protobuf import field_mask_pb2

        if not labels:
            return
        info = self.content_pb.Info(digest=digest, labels=labels)
        mask = field_mask_pb2.FieldMask(paths=[f"labels.{key}" for key in labels])
        self._call(self.content.Update, self.content_pb.UpdateRequest(info=info, update_mask=mask))

    def list_content(self, filters: Sequence[str]) -> list[Any]:
        request = self.content_pb.ListContentRequest(filters=list(filters))
        return [info for response in self._call(self.content.List, request) for info in response.info]

    def delete_content(self, digest: str) -> None:
        with contextlib.suppress(grpc.RpcError):
            self._call(self.content.Delete, self.content_pb.DeleteContentRequest(digest=digest))

    # -- snapshots ----------------------------------------------------------------------------------

    def _mounts(self, messages: Iterable[Any]) -> list[Mount]:
        return [
            Mount(type=m.type, source=m.source, target=m.target, options=list(m.options)) for m in messages
        ]

    def to_pb(self, mounts: Sequence[Mount]) -> list[Any]:
        return [
            self.mount_pb.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))
            for m in mounts
        ]

    def prepare(self, snapshotter: str, key: str, parent: str) -> list[Mount]:
        request = self.snapshots_pb.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent)
        return self._mounts(self._call(self.snapshots.Prepare, request, leased=True).mounts)

    def view(self, snapshotter: str, key: str, parent: str) -> list[Mount]:
        request = self.snapshots_pb.ViewSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent)
        return self._mounts(self._call(self.snapshots.View, request, leased=True).mounts)

    def commit(self, snapshotter: str, name: str, key: str, labels: dict[str, str] | None = None) -> None:
        request = self.snapshots_pb.CommitSnapshotRequest(
            snapshotter=snapshotter, name=name, key=key, labels=labels
        )
        self._call(self.snapshots.Commit, request, leased=True, timeout=300)

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        request = self.snapshots_pb.RemoveSnapshotRequest(snapshotter=snapshotter, key=key)
        try:
            self._call(self.snapshots.Remove, request)
        except grpc.RpcError as exc:
            if not not_found(exc):
                raise

    def snapshot_exists(self, snapshotter: str, key: str) -> bool:
        request = self.snapshots_pb.StatSnapshotRequest(snapshotter=snapshotter, key=key)
        try:
            self._call(self.snapshots.Stat, request)
        except grpc.RpcError as exc:
            if not_found(exc):
                return False
            raise
        return True

    def lease_snapshot(self, snapshotter: str, key: str) -> None:
        if self.lease_id:
            resource = self.leases_pb.Resource(id=key, type=f"snapshots/{snapshotter}")
            self._call(
                self.leases.AddResource,
                self.leases_pb.AddResourceRequest(id=self.lease_id, resource=resource),
            )

    def list_snapshots(self, snapshotter: str) -> list[Any]:
        request = self.snapshots_pb.ListSnapshotsRequest(snapshotter=snapshotter)
        return [info for response in self._call(self.snapshots.List, request) for info in response.info]

    # -- diff ---------------------------------------------------------------------------------------

    def diff(self, lower: Sequence[Mount], upper: Sequence[Mount], media_type: str) -> Descriptor:
        request = self.diff_pb.DiffRequest(
            left=self.to_pb(lower), right=self.to_pb(upper), media_type=media_type
        )
        diff = self._call(self.diff_stub.Diff, request, leased=True, timeout=None).diff
        self.lease_content(diff.digest)
        return Descriptor(media_type=diff.media_type, digest=diff.digest, size=diff.size)

    def apply(self, layer: Descriptor, mounts: Sequence[Mount]) -> str:
        from runtimed.api.containerd.types import descriptor_pb2

        desc = descriptor_pb2.Descriptor(media_type=layer.media_type, digest=layer.digest, size=layer.size)
        request = self.diff_pb.ApplyRequest(diff=desc, mounts=self.to_pb(mounts))
        return self._call(self.diff_stub.Apply, request, leased=True, timeout=None).applied.digest

    # -- containers and tasks -------------------------------------------------------------------------

    def create_container(
        self, container_id: str, spec: dict[str, Any], runtime: str, snapshotter: str
    ) -> None:
        from google.protobuf import any_pb2

        container = self.containers_pb.Container(
            id=container_id,
            labels={"runtimed.build": "1"},
            runtime=self.containers_pb.Container.Runtime(name=runtime),
            spec=any_pb2.Any(type_url=SPEC_TYPE_URL, value=json.dumps(spec).encode()),
            snapshotter=snapshotter,
            snapshot_key=container_id,
        )
        request = self.containers_pb.CreateContainerRequest(container=container)
        self._call(self.containers.Create, request, leased=True)

    def delete_container(self, container_id: str) -> None:
        with contextlib.suppress(grpc.RpcError):
            self._call(self.containers.Delete, self.containers_pb.DeleteContainerRequest(id=container_id))

    def create_task(self, container_id: str, mounts: Sequence[Mount], stdout: str, stderr: str) -> None:
        request = self.tasks_pb.CreateTaskRequest(
            container_id=container_id, rootfs=self.to_pb(mounts), stdout=stdout, stderr=stderr
        )
        self._call(self.tasks.Create, request, timeout=120)

    def start_task(self, container_id: str) -> None:
        self._call(self.tasks.Start, self.tasks_pb.StartRequest(container_id=container_id), timeout=120)

    def wait_future(self, container_id: str) -> Any:
        return self.tasks.Wait.future(self.tasks_pb.WaitRequest(container_id=container_id), metadata=self.md)

    def kill_task(self, container_id: str, signal: int) -> None:
        request = self.tasks_pb.KillRequest(container_id=container_id, signal=signal, all=True)
        with contextlib.suppress(grpc.RpcError):
            self._call(self.tasks.Kill, request)

    def delete_task(self, container_id: str) -> None:
        with contextlib.suppress(grpc.RpcError):
            self._call(
                self.tasks.Delete, self.tasks_pb.DeleteTaskRequest(container_id=container_id), timeout=120
            )

    # -- images -------------------------------------------------------------------------------------

    def image(self, name: str) -> Any | None:
        try:
            return self._call(self.images.Get, self.images_pb.GetImageRequest(name=name)).image
        except grpc.RpcError as exc:
            if not_found(exc):
                return None
            raise

    def put_image(self, name: str, target: Descriptor) -> None:
        """Create the image record, or point an existing one at the new target."""
        from google.protobuf import field_mask_pb2

        from runtimed.api.containerd.types import descriptor_pb2

        desc = descriptor_pb2.Descriptor(media_type=target.media_type, digest=target.digest, size=target.size)
        image = self.images_pb.Image(name=name, target=desc)
        try:
            self._call(self.images.Create, self.images_pb.CreateImageRequest(image=image))
        except grpc.RpcError as exc:
            if not already_exists(exc):
                raise
            mask = field_mask_pb2.FieldMask(paths=["target"])
            self._call(self.images.Update, self.images_pb.UpdateImageRequest(image=image, update_mask=mask))

    def pull(self, reference: str, snapshotter: str) -> Iterator[Any]:
        request = self.transfer_pb.PullRequest(reference=reference, unpack=True, snapshotter=snapshotter)
        return self.transfer.Pull(request, metadata=self.md)
