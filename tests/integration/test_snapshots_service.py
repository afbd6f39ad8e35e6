"""Snapshots service through gRPC with our generated stubs, against a real daemon."""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from runtimed.api.containerd.events import snapshot_pb2 as events_pb2
from runtimed.api.containerd.services.events.v1 import events_pb2 as ev_pb
from runtimed.api.containerd.services.events.v1 import events_pb2_grpc as ev_grpc
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from runtimed.plugin import host_platform
from runtimed.wire import NAMESPACE_KEY

SNAPSHOTTERS = ["overlayfs", "native"]


def meta(namespace: str = "default") -> list[tuple[str, str]]:
    return [(NAMESPACE_KEY, namespace)]


@pytest.fixture
def channel(daemon):
    with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
        yield channel


@pytest.fixture
def snapshots(channel) -> pb_grpc.SnapshotsStub:
    return pb_grpc.SnapshotsStub(channel)


@pytest.fixture(params=SNAPSHOTTERS)
def snapshotter(request, client) -> str:
    loaded = {p.id for p in client.plugins(["type==io.containerd.snapshotter.v1"]) if not p.init_err.message}
    if request.param not in loaded:
        pytest.skip(f"snapshotter {request.param} did not load on this host")
    return request.param


def error_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_snapshotters_are_plugins_with_root_and_platform(client, daemon):
    plugins = {p.id: p for p in client.plugins(["type==io.containerd.snapshotter.v1"])}
    assert set(plugins) == {"overlayfs", "native"}
    for plugin_id, plugin in plugins.items():
        if plugin.init_err.message:
            assert os.geteuid() != 0 and plugin_id == "overlayfs"  # only a non-root run skips it
            continue
        assert plugin.exports["root"] == str(daemon.root / f"io.containerd.snapshotter.v1.{plugin_id}")
        host = host_platform()
        assert [(p.os, p.architecture) for p in plugin.platforms] == [(host.os, host.architecture)]
    service = client.plugins(["type==io.containerd.grpc.v1,id==snapshots"])
    assert len(service) == 1 and not service[0].init_err.message


@pytest.mark.parametrize(
    ("name", "message"),
    [("", "snapshotter argument missing"), ("zfs", "snapshotter not loaded: zfs")],
)
def test_snapshotter_argument_is_validated_on_every_method(snapshots, name, message):
    calls = [
        lambda: snapshots.Prepare(pb.PrepareSnapshotRequest(snapshotter=name, key="k"), metadata=meta()),
        lambda: snapshots.View(pb.ViewSnapshotRequest(snapshotter=name, key="k"), metadata=meta()),
        lambda: snapshots.Mounts(pb.MountsRequest(snapshotter=name, key="k"), metadata=meta()),
        lambda: snapshots.Commit(
            pb.CommitSnapshotRequest(snapshotter=name, name="n", key="k"), metadata=meta()
        ),
        lambda: snapshots.Remove(pb.RemoveSnapshotRequest(snapshotter=name, key="k"), metadata=meta()),
        lambda: snapshots.Stat(pb.StatSnapshotRequest(snapshotter=name, key="k"), metadata=meta()),
        lambda: snapshots.Update(
            pb.UpdateSnapshotRequest(snapshotter=name, info=pb.Info(name="k")), metadata=meta()
        ),
        lambda: list(snapshots.List(pb.ListSnapshotsRequest(snapshotter=name), metadata=meta())),
        lambda: snapshots.Usage(pb.UsageRequest(snapshotter=name, key="k"), metadata=meta()),
        lambda: snapshots.Cleanup(pb.CleanupRequest(snapshotter=name), metadata=meta()),
    ]
    for call in calls:
        error = error_of(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == f"{message}: invalid argument"


class Snaps:
    """One snapshotter through the stub: short calls for the tests below."""

    def __init__(self, stub: pb_grpc.SnapshotsStub, snapshotter: str) -> None:
        self.stub, self.s = stub, snapshotter

    def prepare(self, key: str, parent: str = "", labels=None, ns: str = "default"):
        request = pb.PrepareSnapshotRequest(snapshotter=self.s, key=key, parent=parent, labels=labels)
        return self.stub.Prepare(request, metadata=meta(ns)).mounts

    def view(self, key: str, parent: str = "", ns: str = "default"):
        request = pb.ViewSnapshotRequest(snapshotter=self.s, key=key, parent=parent)
        return self.stub.View(request, metadata=meta(ns)).mounts

    def mounts(self, key: str, ns: str = "default"):
        return self.stub.Mounts(pb.MountsRequest(snapshotter=self.s, key=key), metadata=meta(ns)).mounts

    def commit(self, name: str, key: str, labels=None, ns: str = "default") -> None:
        request = pb.CommitSnapshotRequest(snapshotter=self.s, name=name, key=key, labels=labels)
        self.stub.Commit(request, metadata=meta(ns))

    def remove(self, key: str, ns: str = "default") -> None:
        self.stub.Remove(pb.RemoveSnapshotRequest(snapshotter=self.s, key=key), metadata=meta(ns))

    def stat(self, key: str, ns: str = "default") -> pb.Info:
        return self.stub.Stat(pb.StatSnapshotRequest(snapshotter=self.s, key=key), metadata=meta(ns)).info

    def update(self, name: str, labels: dict[str, str], paths: list[str], ns: str = "default") -> pb.Info:
        request = pb.UpdateSnapshotRequest(
            snapshotter=self.s,
            info=pb.Info(name=name, labels=labels),
            update_mask=field_mask_pb2.FieldMask(paths=paths),
        )
        return self.stub.Update(request, metadata=meta(ns)).info

    def list(self, *filters: str, ns: str = "default") -> list[pb.Info]:
        request = pb.ListSnapshotsRequest(snapshotter=self.s, filters=list(filters))
        return [info for response in self.stub.List(request, metadata=meta(ns)) for info in response.info]

    def usage(self, key: str, ns: str = "default") -> pb.UsageResponse:
        return self.stub.Usage(pb.UsageRequest(snapshotter=self.s, key=key), metadata=meta(ns))

    def cleanup(self) -> None:
        self.stub.Cleanup(pb.CleanupRequest(snapshotter=self.s), metadata=meta())


@pytest.fixture
def snaps(snapshots, snapshotter) -> Snaps:
    return Snaps(snapshots, snapshotter)


def status(call) -> tuple[grpc.StatusCode, str]:
    error = error_of(call)
    return error.code(), error.details()


def test_lifecycle(snaps):
    prepared = snaps.prepare("k1", labels={"a": "1"})
    assert [(m.type, list(m.options), m.target) for m in prepared] == [("bind", ["rw", "rbind"], "")]
    Path(prepared[0].source, "hello").write_text("world")  # a base layer is a plain directory
    assert snaps.mounts("k1") == prepared

    active = snaps.stat("k1")
    assert (active.name, active.parent, active.kind, dict(active.labels)) == ("k1", "", pb.ACTIVE, {"a": "1"})
    assert active.created_at.seconds > 0 and active.updated_at == active.created_at
    live = snaps.usage("k1")
    assert live.inodes == 2 and live.size > 0

    snaps.commit("c1", "k1", labels={"b": "2"})
    committed = snaps.stat("c1")
    assert (committed.kind, dict(committed.labels)) == (pb.COMMITTED, {"b": "2"})
    assert snaps.usage("c1") == live

    child = snaps.prepare("k2", "c1")
    if snaps.s == "overlayfs":
        assert child[0].type == "overlay" and child[0].source == "overlay"
        assert any(o.startswith("lowerdir=") and o.endswith("/fs") for o in child[0].options)
    else:
        assert Path(child[0].source, "hello").read_text() == "world"  # native copies the parent
    view = snaps.view("v1", "c1")
    assert [(m.type, list(m.options)) for m in view] == [("bind", ["ro", "rbind"])]
    assert Path(view[0].source, "hello").read_text() == "world"

    updated = snaps.update("c1", {"c": "3"}, ["labels.c", "labels.b"])
    assert (updated.name, updated.kind, dict(updated.labels)) == ("c1", pb.COMMITTED, {"c": "3"})
    assert updated.updated_at.ToNanoseconds() > updated.created_at.ToNanoseconds()

    assert [(i.name, i.parent, i.kind) for i in snaps.list()] == [
        ("c1", "", pb.COMMITTED),
        ("k2", "c1", pb.ACTIVE),
        ("v1", "c1", pb.VIEW),
    ]
    assert [i.name for i in snaps.list("kind==view")] == ["v1"]

    for key in ("k2", "v1", "c1"):
        snaps.remove(key)
    snaps.cleanup()
    assert snaps.list() == []
    assert not Path(prepared[0].source).exists()


def test_error_codes(snaps):
    assert status(lambda: snaps.stat("sha256:abc")) == (
        grpc.StatusCode.NOT_FOUND,
        "snapshot sha256:abc does not exist: not found",
    )
    assert status(lambda: snaps.prepare("k", "gone")) == (
        grpc.StatusCode.NOT_FOUND,
        "parent snapshot gone does not exist: not found",
    )
    snaps.prepare("k")
    assert status(lambda: snaps.prepare("k")) == (
        grpc.StatusCode.ALREADY_EXISTS,
        'snapshot "k": already exists',
    )
    assert status(lambda: snaps.prepare("k2", "k"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    snaps.commit("c", "k")
    snaps.prepare("k2", "c")
    assert status(lambda: snaps.commit("c", "k2"))[0] == grpc.StatusCode.ALREADY_EXISTS
    assert status(lambda: snaps.commit("c2", "c"))[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert status(lambda: snaps.mounts("c"))[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert status(lambda: snaps.remove("c")) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "cannot remove snapshot with child: failed precondition",
    )
    assert status(lambda: snaps.update("c", {}, ["kind"]))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert status(lambda: snaps.list("name=="))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_list_streams_batches_of_100(snapshots):
    native = Snaps(snapshots, "native")
    for i in range(205):
        native.view(f"v{i:03d}")
    responses = snapshots.List(pb.ListSnapshotsRequest(snapshotter="native"), metadata=meta())
    assert [len(r.info) for r in responses] == [100, 100, 5]


def test_namespaces_are_isolated_and_created_implicitly(snaps, client):
    snaps.prepare("k1", labels={"t": "a"}, ns="team-a")
    snaps.prepare("k1", labels={"t": "b"}, ns="team-b")
    assert {"team-a", "team-b"} <= {n.name for n in client.namespaces()}
    for team in ("a", "b"):
        assert dict(snaps.stat("k1", ns=f"team-{team}").labels) == {"t": team}
    snaps.commit("base", "k1", ns="team-a")
    assert status(lambda: snaps.prepare("k2", "base", ns="team-b"))[0] == grpc.StatusCode.NOT_FOUND
    assert snaps.list(ns="team-c") == []
    assert status(lambda: snaps.stat("k1", ns="bad ns"))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_prepare_commit_remove_publish_events(channel, snapshots):
    native = Snaps(snapshots, "native")
    received: queue.Queue = queue.Queue()
    stream = ev_grpc.EventsStub(channel).Subscribe(
        ev_pb.SubscribeRequest(filters=['topic~="^/snapshot/"']), metadata=meta()
    )

    def pump() -> None:
        try:
            for envelope in stream:
                received.put(envelope)
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        # Subscribe has no acknowledgement: publish probes until the stream is live.
        for attempt in range(50):
            native.prepare(f"probe-{attempt}")
            try:
                received.get(timeout=0.1)
                break
            except queue.Empty:
                continue

        native.prepare("k", ns="evts")
        native.view("v", ns="evts")
        native.commit("c", "k", ns="evts")
        native.prepare("k2", "c", ns="evts")
        native.remove("k2", ns="evts")
        envelopes = []
        while len(envelopes) < 4:
            envelope = received.get(timeout=10)
            if envelope.namespace == "evts":  # a late probe event is not ours
                envelopes.append(envelope)
    finally:
        stream.cancel()
        reader.join(timeout=10)
    assert [(e.namespace, e.topic, e.event.type_url) for e in envelopes] == [
        ("evts", "/snapshot/prepare", "containerd.events.SnapshotPrepare"),
        ("evts", "/snapshot/commit", "containerd.events.SnapshotCommit"),
        ("evts", "/snapshot/prepare", "containerd.events.SnapshotPrepare"),
        ("evts", "/snapshot/remove", "containerd.events.SnapshotRemove"),
    ]
    assert events_pb2.SnapshotPrepare.FromString(envelopes[0].event.value) == events_pb2.SnapshotPrepare(
        key="k", snapshotter="native"
    )
    assert events_pb2.SnapshotCommit.FromString(envelopes[1].event.value) == events_pb2.SnapshotCommit(
        key="k", name="c", snapshotter="native"
    )
    assert events_pb2.SnapshotPrepare.FromString(envelopes[2].event.value).parent == "c"
    assert events_pb2.SnapshotRemove.FromString(envelopes[3].event.value) == events_pb2.SnapshotRemove(
        key="k2", snapshotter="native"
    )


def test_snapshots_survive_restart_and_kill_9(daemon, snapshotter):
    s = snapshotter

    def stub_call(method: str, request):
        with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
            result = getattr(pb_grpc.SnapshotsStub(channel), method)(request, metadata=meta())
            return list(result) if method == "List" else result

    mounts = stub_call("Prepare", pb.PrepareSnapshotRequest(snapshotter=s, key="k1")).mounts
    stub_call("Commit", pb.CommitSnapshotRequest(snapshotter=s, name="c1", key="k1"))
    # A gc.root label keeps the chain from the start-up garbage collection (nothing else holds it).
    root = {"containerd.io/gc.root": "test"}
    child = stub_call(
        "Prepare", pb.PrepareSnapshotRequest(snapshotter=s, key="k2", parent="c1", labels=root)
    ).mounts
    daemon.restart()
    assert stub_call("Stat", pb.StatSnapshotRequest(snapshotter=s, key="c1")).info.kind == pb.COMMITTED
    daemon.kill()
    daemon.start()
    assert stub_call("Mounts", pb.MountsRequest(snapshotter=s, key="k2")).mounts == child
    assert Path(mounts[0].source).parent.name == "1"  # c1 kept its directory
    listed = [i.name for r in stub_call("List", pb.ListSnapshotsRequest(snapshotter=s)) for i in r.info]
    assert listed == ["c1", "k2"]
