"""Diff service through gRPC, against a real daemon: unpack layers as ctr does, and diff snapshots.

The sequence is ctr's unpack (§2.5 of the API reference): Content.Write the blob, Snapshots.Prepare,
Diff.Apply, Snapshots.Commit under the chainID, for two layers (the second one with whiteouts),
on both snapshotters. Needs root (snapshots are real directories owned by root, overlay).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import tarfile
from collections.abc import Iterator

import grpc
import pytest

from runtimed.api.containerd.services.content.v1 import content_pb2 as cpb
from runtimed.api.containerd.services.content.v1 import content_pb2_grpc as cpb_grpc
from runtimed.api.containerd.services.diff.v1 import diff_pb2 as pb
from runtimed.api.containerd.services.diff.v1 import diff_pb2_grpc as pb_grpc
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2 as spb
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as spb_grpc
from runtimed.api.containerd.types import descriptor_pb2
from runtimed.wire import NAMESPACE_KEY

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: layers are applied with their owners"),
]

GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
TAR_LAYER = "application/vnd.oci.image.layer.v1.tar"
META = [(NAMESPACE_KEY, "default")]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer(entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mode in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_600_000_000
            info.mode = mode
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


LAYER1 = layer(
    [
        ("etc/", None, 0o755),
        ("etc/hostname", b"one\n", 0o644),
        ("etc/gone", b"x", 0o644),
        ("bin/", None, 0o755),
    ]
)
LAYER2 = layer([("etc/", None, 0o755), ("etc/.wh.gone", b"", 0o644), ("bin/tool", b"#!/bin/sh\n", 0o755)])


@pytest.fixture
def channel(daemon) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
        yield channel


@pytest.fixture(params=["overlayfs", "native"])
def snapshotter(request, channel) -> str:
    snapshots = spb_grpc.SnapshotsStub(channel)
    try:
        snapshots.List(spb.ListSnapshotsRequest(snapshotter=request.param), metadata=META).__next__()
    except StopIteration:
        pass
    except grpc.RpcError as exc:
        pytest.skip(f"snapshotter {request.param} unavailable: {exc.details()}")
    return request.param


def put_blob(channel, data: bytes) -> str:
    digest = sha(data)
    request = cpb.WriteContentRequest(
        action=cpb.COMMIT, ref=f"layer-{digest}", total=len(data), expected=digest, data=data
    )
    responses = cpb_grpc.ContentStub(channel).Write(iter([request]), metadata=META)
    try:
        for _ in responses:
            pass
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
    return digest


def read_blob(channel, digest: str) -> bytes:
    stub = cpb_grpc.ContentStub(channel)
    return b"".join(r.data for r in stub.Read(cpb.ReadContentRequest(digest=digest), metadata=META))


def unpack(channel, snapshotter: str) -> list[str]:
    """Unpack LAYER1 and LAYER2 as ctr does; returns the chainIDs."""
    snapshots = spb_grpc.SnapshotsStub(channel)
    diff = pb_grpc.DiffStub(channel)
    parent, chain = "", []
    for index, raw in enumerate((LAYER1, LAYER2)):
        blob = gzip.compress(raw)
        digest = put_blob(channel, blob)
        diff_id = sha(raw)
        chain_id = diff_id if not parent else sha(f"{parent} {diff_id}".encode())
        key = f"extract-{index} {chain_id}"
        prepared = snapshots.Prepare(
            spb.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent), metadata=META
        )
        request = pb.ApplyRequest(
            diff=descriptor_pb2.Descriptor(media_type=GZIP_LAYER, digest=digest, size=len(blob)),
            mounts=prepared.mounts,
        )
        applied = diff.Apply(request, metadata=META).applied
        assert (applied.media_type, applied.digest, applied.size) == (TAR_LAYER, diff_id, len(raw))
        snapshots.Commit(
            spb.CommitSnapshotRequest(snapshotter=snapshotter, name=chain_id, key=key), metadata=META
        )
        parent = chain_id
        chain.append(chain_id)
    return chain


def test_unpack_then_diff_the_snapshots(channel, snapshotter, tmp_path):
    chain = unpack(channel, snapshotter)
    snapshots = spb_grpc.SnapshotsStub(channel)
    views = []
    for index, chain_id in enumerate(chain):
        view = snapshots.View(
            spb.ViewSnapshotRequest(snapshotter=snapshotter, key=f"view-{index}", parent=chain_id),
            metadata=META,
        )
        views.append(view.mounts)

    # The top snapshot, mounted, shows both layers with the whiteout applied.
    target = tmp_path / "rootfs"
    target.mkdir()
    mounts = views[1]
    assert len(mounts) == 1
    options = ",".join(o for o in mounts[0].options)
    subprocess.run(["mount", "-t", mounts[0].type, "-o", options, mounts[0].source, str(target)], check=True)
    try:
        assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == [
            "bin",
            "bin/tool",
            "etc",
            "etc/hostname",
        ]
        assert (target / "etc/hostname").read_text() == "one\n"
    finally:
        subprocess.run(["umount", str(target)], check=True)

    diff = pb_grpc.DiffStub(channel)
    response = diff.Diff(pb.DiffRequest(left=views[0], right=views[1], ref="diff-test"), metadata=META)
    assert response.diff.media_type == GZIP_LAYER
    blob = read_blob(channel, response.diff.digest)
    assert sha(blob) == response.diff.digest and len(blob) == response.diff.size
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        names = tar.getnames()
    assert "etc/.wh.gone" in names and "bin/tool" in names and "etc/hostname" not in names
    info = (
        cpb_grpc.ContentStub(channel).Info(cpb.InfoRequest(digest=response.diff.digest), metadata=META).info
    )
    assert info.labels["containerd.io/uncompressed"] == sha(gzip.decompress(blob))

    # The same diff again: the blob exists already, which is fine.
    again = diff.Diff(pb.DiffRequest(left=views[0], right=views[1]), metadata=META)
    assert again.diff.digest == response.diff.digest

    plain = diff.Diff(pb.DiffRequest(left=views[0], right=views[1], media_type=TAR_LAYER), metadata=META)
    assert plain.diff.digest == info.labels["containerd.io/uncompressed"]


def test_apply_errors(channel, tmp_path):
    diff = pb_grpc.DiffStub(channel)
    target = tmp_path / "t"
    target.mkdir()
    mounts = [{"type": "bind", "source": str(target), "options": ["rw", "rbind"]}]
    missing = pb.ApplyRequest(
        diff=descriptor_pb2.Descriptor(media_type=GZIP_LAYER, digest=sha(b"nope"), size=4), mounts=mounts
    )
    with pytest.raises(grpc.RpcError) as info:
        diff.Apply(missing, metadata=META)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    attack = layer([("../escape", b"x", 0o644)])
    digest = put_blob(channel, attack)
    request = pb.ApplyRequest(
        diff=descriptor_pb2.Descriptor(media_type=TAR_LAYER, digest=digest, size=len(attack)), mounts=mounts
    )
    with pytest.raises(grpc.RpcError) as info:
        diff.Apply(request, metadata=META)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'..' path component refused" in info.value.details()
    assert not (tmp_path / "escape").exists()

    request.diff.media_type = "application/vnd.oci.image.config.v1+json"
    with pytest.raises(grpc.RpcError) as info:
        diff.Apply(request, metadata=META)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    with pytest.raises(grpc.RpcError) as info:
        diff.Diff(pb.DiffRequest(left=[], right=mounts, media_type="application/x-lz4"), metadata=META)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_differ_and_service_are_plugins(client):
    differ = client.plugins(["type==io.containerd.differ.v1"])
    assert [(p.id, p.init_err.message) for p in differ] == [("walking", "")]
    service = client.plugins(["type==io.containerd.grpc.v1,id==diff"])
    assert len(service) == 1 and not service[0].init_err.message
