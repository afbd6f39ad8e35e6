"""Leases service through gRPC with our generated stubs, against a real daemon."""

from __future__ import annotations

import grpc
import pytest

from runtimed.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from runtimed.api.containerd.services.leases.v1 import leases_pb2 as pb
from runtimed.api.containerd.services.leases.v1 import leases_pb2_grpc as pb_grpc
from runtimed.wire import LEASE_KEY, NAMESPACE_KEY

DIGEST = "sha256:" + "d" * 64


def meta(namespace: str = "default") -> list[tuple[str, str]]:
    return [(NAMESPACE_KEY, namespace)]


@pytest.fixture
def leases(daemon):
    with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
        yield pb_grpc.LeasesStub(channel)


def error_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_create_list_delete(leases, client):
    created = leases.Create(
        pb.CreateRequest(id="import-1", labels={"containerd.io/gc.expire": "2030-01-01T00:00:00Z"}),
        metadata=meta("team"),
    ).lease
    assert created.id == "import-1" and created.created_at.seconds > 0
    assert dict(created.labels) == {"containerd.io/gc.expire": "2030-01-01T00:00:00Z"}
    # Like containerd: the first write in a namespace creates it.
    assert "team" in [n.name for n in client.namespaces()]
    generated = leases.Create(pb.CreateRequest(), metadata=meta("team")).lease
    assert generated.id and generated.id != "import-1"
    error = error_of(lambda: leases.Create(pb.CreateRequest(id="import-1"), metadata=meta("team")))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    listed = leases.List(pb.ListRequest(), metadata=meta("team")).leases
    assert sorted(lease.id for lease in listed) == sorted(["import-1", generated.id])
    only = leases.List(pb.ListRequest(filters=['labels."containerd.io/gc.expire"']), metadata=meta("team"))
    assert [lease.id for lease in only.leases] == ["import-1"]
    assert leases.List(pb.ListRequest(filters=["id==nope"]), metadata=meta("team")).leases == []
    # Namespaces are the tenant boundary.
    assert leases.List(pb.ListRequest(), metadata=meta("other")).leases == []
    error = error_of(lambda: leases.Delete(pb.DeleteRequest(id="import-1"), metadata=meta("other")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    leases.Delete(pb.DeleteRequest(id="import-1", sync=True), metadata=meta("team"))
    leases.Delete(pb.DeleteRequest(id=generated.id), metadata=meta("team"))
    assert leases.List(pb.ListRequest(), metadata=meta("team")).leases == []
    error = error_of(lambda: leases.Delete(pb.DeleteRequest(id="import-1"), metadata=meta("team")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "not found" in error.details()


def test_invalid_ids_and_filters(leases):
    error = error_of(lambda: leases.Create(pb.CreateRequest(id="not valid!"), metadata=meta()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = error_of(lambda: leases.List(pb.ListRequest(filters=["id=="]), metadata=meta()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_resources(leases):
    leases.Create(pb.CreateRequest(id="l1"), metadata=meta())
    resources = [
        pb.Resource(id=DIGEST, type="content"),
        pb.Resource(id="layer-sha256:abc", type="ingests"),
        pb.Resource(id="extract-1 sha256:abc", type="snapshots/overlayfs"),
    ]
    for resource in resources:
        leases.AddResource(pb.AddResourceRequest(id="l1", resource=resource), metadata=meta())
    # Adding twice is harmless.
    leases.AddResource(pb.AddResourceRequest(id="l1", resource=resources[0]), metadata=meta())
    listed = leases.ListResources(pb.ListResourcesRequest(id="l1"), metadata=meta()).resources
    assert sorted((r.type, r.id) for r in listed) == sorted((r.type, r.id) for r in resources)
    leases.DeleteResource(pb.DeleteResourceRequest(id="l1", resource=resources[1]), metadata=meta())
    listed = leases.ListResources(pb.ListResourcesRequest(id="l1"), metadata=meta()).resources
    assert sorted(r.type for r in listed) == ["content", "snapshots/overlayfs"]
    bad = pb.Resource(id="x", type="images")
    error = error_of(
        lambda: leases.AddResource(pb.AddResourceRequest(id="l1", resource=bad), metadata=meta())
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    for call in (
        lambda: leases.AddResource(pb.AddResourceRequest(id="l2", resource=resources[0]), metadata=meta()),
        lambda: leases.DeleteResource(
            pb.DeleteResourceRequest(id="l2", resource=resources[0]), metadata=meta()
        ),
        lambda: leases.ListResources(pb.ListResourcesRequest(id="l2"), metadata=meta()),
        lambda: leases.ListResources(pb.ListResourcesRequest(id="l1"), metadata=meta("other")),
    ):
        assert error_of(call).code() == grpc.StatusCode.NOT_FOUND
    # Deleting the lease drops its resources with it.
    leases.Delete(pb.DeleteRequest(id="l1"), metadata=meta())
    leases.Create(pb.CreateRequest(id="l1"), metadata=meta())
    assert leases.ListResources(pb.ListResourcesRequest(id="l1"), metadata=meta()).resources == []


def test_ids_made_by_containerd_clients_are_accepted(leases, daemon):
    # leases.WithRandomID: "<nanoseconds>-<base64url of 3 bytes>", which may start or end with
    # "-" or "_": not an identifier, yet `ctr images import/pull` sends such ids.
    for lease_id in ("830717848--jjQ", "267601561-DK9-", "12-_a_z"):
        created = leases.Create(pb.CreateRequest(id=lease_id), metadata=meta()).lease
        assert created.id == lease_id
        resource = pb.Resource(id=DIGEST, type="content")
        leases.AddResource(pb.AddResourceRequest(id=lease_id, resource=resource), metadata=meta())
        with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
            content = content_pb2_grpc.ContentStub(channel)
            # The lease header of a call inside the lease passes the edge too.
            listed = content.List(content_pb2.ListContentRequest(), metadata=[*meta(), (LEASE_KEY, lease_id)])
            assert list(listed) == []
        leases.Delete(pb.DeleteRequest(id=lease_id), metadata=meta())
    error = error_of(lambda: leases.Create(pb.CreateRequest(id="has space"), metadata=meta()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
