"""Content service through gRPC with our generated stubs, against a real daemon."""

from __future__ import annotations

import hashlib
import os
import queue
import time
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import field_mask_pb2

from runtimed.api.containerd.services.content.v1 import content_pb2 as pb
from runtimed.api.containerd.services.content.v1 import content_pb2_grpc as pb_grpc
from runtimed.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from runtimed.wire import LEASE_KEY, MAX_MESSAGE_SIZE, NAMESPACE_KEY

MIB = 1 << 20
CONTENT_ROOT = "io.containerd.content.v1.content"
EMPTY = "sha256:" + hashlib.sha256(b"").hexdigest()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def meta(namespace: str = "default", lease: str = "") -> list[tuple[str, str]]:
    headers = [(NAMESPACE_KEY, namespace)]
    return [*headers, (LEASE_KEY, lease)] if lease else headers


@pytest.fixture
def channel(daemon) -> Iterator[grpc.Channel]:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
        ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
    ]
    with grpc.insecure_channel(f"unix://{daemon.socket_path}", options=options) as ch:
        yield ch


@pytest.fixture
def stub(channel) -> pb_grpc.ContentStub:
    return pb_grpc.ContentStub(channel)


class WriteStream:
    """One Content.Write stream driven in lockstep, as containerd's Go client does."""

    def __init__(self, stub: pb_grpc.ContentStub, namespace: str = "default", lease: str = "") -> None:
        self._requests: queue.Queue[pb.WriteContentRequest | None] = queue.Queue()
        self._responses = stub.Write(
            iter(self._requests.get, None), metadata=meta(namespace, lease), timeout=60
        )

    def send(self, **fields) -> pb.WriteContentResponse:
        self._requests.put(pb.WriteContentRequest(**fields))
        return next(self._responses)

    def close(self) -> None:
        self._requests.put(None)

    def cancel(self) -> None:
        self._responses.cancel()


def upload(stub, ref: str, data: bytes, namespace: str = "default", expected: str = "", **labels) -> str:
    stream = WriteStream(stub, namespace)
    stat = stream.send(action=pb.STAT, ref=ref, total=len(data), expected=expected)
    offset = stat.offset
    while offset < len(data):
        offset = stream.send(action=pb.WRITE, offset=offset, data=data[offset : offset + MIB]).offset
    done = stream.send(action=pb.COMMIT, total=len(data), offset=offset, expected=expected, labels=labels)
    stream.close()
    assert done.offset == len(data)
    return done.digest


def error_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def read(stub, digest: str, offset: int = 0, size: int = 0, namespace: str = "default") -> list:
    request = pb.ReadContentRequest(digest=digest, offset=offset, size=size)
    return list(stub.Read(request, metadata=meta(namespace), timeout=30))


def test_write_protocol_step_by_step(stub):
    data = os.urandom(2 * MIB + 100)
    stream = WriteStream(stub)
    stat = stream.send(action=pb.STAT, ref="layer-1", total=len(data))
    assert (stat.action, stat.offset, stat.total, stat.digest) == (pb.STAT, 0, len(data), EMPTY)
    assert stat.started_at.seconds > 0 and stat.updated_at.seconds > 0
    # Status() from the client: STAT without a ref, answered alike.
    again = stream.send(action=pb.STAT)
    assert (again.offset, again.total, again.digest) == (0, len(data), EMPTY)
    first = stream.send(action=pb.WRITE, offset=0, data=data[:MIB])
    assert (first.action, first.offset, first.digest) == (pb.WRITE, MIB, sha(data[:MIB]))
    second = stream.send(action=pb.WRITE, offset=MIB, data=data[MIB : 2 * MIB])
    assert (second.offset, second.digest) == (2 * MIB, sha(data[: 2 * MIB]))
    status = stub.Status(pb.StatusRequest(ref="layer-1"), metadata=meta()).status
    assert (status.ref, status.offset, status.total) == ("layer-1", 2 * MIB, len(data))
    # Not visible before the commit.
    assert error_of(lambda: stub.Info(pb.InfoRequest(digest=sha(data)), metadata=meta())).code() == (
        grpc.StatusCode.NOT_FOUND
    )
    done = stream.send(
        action=pb.COMMIT,
        total=len(data),
        offset=2 * MIB,
        data=data[2 * MIB :],
        expected=sha(data),
        labels={"containerd.io/uncompressed": sha(b"x")},
    )
    assert (done.action, done.offset, done.digest) == (pb.COMMIT, len(data), sha(data))
    stream.close()
    info = stub.Info(pb.InfoRequest(digest=sha(data)), metadata=meta()).info
    assert (info.digest, info.size, dict(info.labels)) == (
        sha(data),
        len(data),
        {"containerd.io/uncompressed": sha(b"x")},
    )
    assert info.created_at.seconds > 0 and info.updated_at == info.created_at
    assert b"".join(r.data for r in read(stub, sha(data))) == data
    assert stub.ListStatuses(pb.ListStatusesRequest(filters=[""]), metadata=meta()).statuses == []


def test_write_errors_end_the_stream(stub):
    stream = WriteStream(stub)
    stream.send(action=pb.STAT, ref="r", total=10)
    stream.send(action=pb.WRITE, offset=0, data=b"12345")
    error = error_of(lambda: stream.send(action=pb.WRITE, offset=3, data=b"678"))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "write @3 must occur at current offset 5" in error.details()
    # The ingest survives for a resume; offset 0 truncates it.
    stream = WriteStream(stub)
    assert stream.send(action=pb.STAT, ref="r", total=10).offset == 5
    assert stream.send(action=pb.WRITE, offset=0, data=b"abc").offset == 3
    error = error_of(lambda: stream.send(action=pb.COMMIT, total=10, offset=3, expected=sha(b"abc")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "failed size validation: 3 != 10" in error.details()
    # First message without a ref.
    stream = WriteStream(stub)
    error = error_of(lambda: stream.send(action=pb.STAT, total=1))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message must have a reference" in error.details()


def test_digest_mismatch_stores_nothing(daemon, stub):
    data = b"some bytes"
    wrong = sha(b"other bytes")
    stream = WriteStream(stub)
    stream.send(action=pb.STAT, ref="bad", total=len(data), expected=wrong)
    stream.send(action=pb.WRITE, offset=0, data=data)
    error = error_of(lambda: stream.send(action=pb.COMMIT, total=len(data), offset=len(data), expected=wrong))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"unexpected commit digest {sha(data)}, expected {wrong}" in error.details()
    root = daemon.root / CONTENT_ROOT
    assert os.listdir(root / "blobs" / "sha256") == [] and os.listdir(root / "ingest") == []
    error = error_of(lambda: stub.Status(pb.StatusRequest(ref="bad"), metadata=meta()))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_duplicates_are_already_exists(stub):
    data = b"duplicate"
    assert upload(stub, "tar-blobs/sha256/x", data) == sha(data)
    # Import style (no expected digest): found at COMMIT.
    stream = WriteStream(stub)
    stream.send(action=pb.STAT, ref="tar-again", total=len(data))
    stream.send(action=pb.WRITE, offset=0, data=data)
    error = error_of(lambda: stream.send(action=pb.COMMIT, total=len(data), offset=len(data)))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error.details() == f"content {sha(data)}: already exists"
    # Pull style (expected digest): found at STAT.
    stream = WriteStream(stub)
    error = error_of(lambda: stream.send(action=pb.STAT, ref="layer-x", total=len(data), expected=sha(data)))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error.details() == f"content {sha(data)}: already exists"
    assert stub.ListStatuses(pb.ListStatusesRequest(), metadata=meta()).statuses == []


def test_content_of_another_namespace_is_adopted_without_upload(stub):
    data = os.urandom(50_000)
    upload(stub, "layer", data, namespace="team-a")
    error = error_of(lambda: stub.Info(pb.InfoRequest(digest=sha(data)), metadata=meta("team-b")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    stream = WriteStream(stub, "team-b")
    stat = stream.send(action=pb.STAT, ref="layer", total=len(data), expected=sha(data))
    assert (stat.offset, stat.total, stat.digest) == (len(data), len(data), sha(data))
    done = stream.send(action=pb.COMMIT, total=len(data), offset=len(data), expected=sha(data))
    assert (done.offset, done.digest) == (len(data), sha(data))
    stream.close()
    assert b"".join(r.data for r in read(stub, sha(data), namespace="team-b")) == data


def test_one_writer_per_ref(stub):
    holder = WriteStream(stub)
    holder.send(action=pb.STAT, ref="busy")
    holder.send(action=pb.WRITE, offset=0, data=b"half")
    contender = WriteStream(stub)
    error = error_of(lambda: contender.send(action=pb.STAT, ref="busy"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "ref busy locked" in error.details()
    error = error_of(lambda: stub.Abort(pb.AbortRequest(ref="busy"), metadata=meta()))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    # The client goes away mid-stream: the lock goes with it, the data stays.
    holder.cancel()
    deadline = time.monotonic() + 10
    while True:
        retry = WriteStream(stub)
        try:
            assert retry.send(action=pb.STAT, ref="busy").offset == 4
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
            time.sleep(0.05)
    retry.send(action=pb.WRITE, offset=4, data=b"-done")
    assert retry.send(action=pb.COMMIT, offset=9).digest == sha(b"half-done")
    retry.close()


def test_status_list_statuses_and_abort(stub):
    stream = WriteStream(stub)
    stream.send(action=pb.STAT, ref="manifest-sha256:aa", total=100, expected=sha(b"m"))
    stream.send(action=pb.WRITE, offset=0, data=b"1234")
    statuses = stub.ListStatuses(pb.ListStatusesRequest(filters=[""]), metadata=meta()).statuses
    assert [(s.ref, s.offset, s.total, s.expected) for s in statuses] == [
        ("manifest-sha256:aa", 4, 100, sha(b"m"))
    ]
    assert statuses[0].started_at.seconds > 0
    filtered = stub.ListStatuses(pb.ListStatusesRequest(filters=["ref~=^layer-"]), metadata=meta())
    assert filtered.statuses == []
    other = stub.ListStatuses(pb.ListStatusesRequest(), metadata=meta("elsewhere"))
    assert other.statuses == []
    stream.close()
    time.sleep(0.2)  # the stream's end releases the ref
    stub.Abort(pb.AbortRequest(ref="manifest-sha256:aa"), metadata=meta())
    error = error_of(lambda: stub.Status(pb.StatusRequest(ref="manifest-sha256:aa"), metadata=meta()))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = error_of(lambda: stub.Abort(pb.AbortRequest(ref="manifest-sha256:aa"), metadata=meta()))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_read_ranges(stub):
    data = os.urandom(2 * MIB + 10)
    digest = upload(stub, "r", data)
    whole = read(stub, digest)
    assert [(r.offset, len(r.data)) for r in whole] == [(0, MIB), (MIB, MIB), (2 * MIB, 10)]
    part = read(stub, digest, offset=MIB - 5, size=10)
    assert [(r.offset, r.data) for r in part] == [(MIB - 5, data[MIB - 5 : MIB + 5])]
    tail = read(stub, digest, offset=2 * MIB, size=1000)
    assert b"".join(r.data for r in tail) == data[2 * MIB :]
    assert read(stub, digest, offset=len(data)) == []
    error = error_of(lambda: read(stub, digest, offset=len(data) + 1))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert error_of(lambda: read(stub, "sha256:zz")).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_of(lambda: read(stub, sha(b"nothing"))).code() == grpc.StatusCode.NOT_FOUND


def test_list_update_delete(stub):
    digests = {upload(stub, f"blob-{i}", f"blob {i}".encode()) for i in range(150)}
    batches = list(stub.List(pb.ListContentRequest(), metadata=meta(), timeout=30))
    assert [len(b.info) for b in batches] == [100, 50]
    listed = [info for batch in batches for info in batch.info]
    assert {i.digest for i in listed} == digests
    assert all(i.created_at.seconds > 0 and not i.HasField("updated_at") for i in listed)
    target = sha(b"blob 7")
    updated = stub.Update(
        pb.UpdateRequest(
            info=pb.Info(digest=target, labels={"containerd.io/gc.ref.content.l.0": sha(b"blob 8")}),
            update_mask=field_mask_pb2.FieldMask(paths=["labels.containerd.io/gc.ref.content.l.0"]),
        ),
        metadata=meta(),
    ).info
    assert (updated.digest, updated.size) == (target, len(b"blob 7"))
    assert dict(updated.labels) == {"containerd.io/gc.ref.content.l.0": sha(b"blob 8")}
    only = list(
        stub.List(
            pb.ListContentRequest(filters=['labels."containerd.io/gc.ref.content.l.0"']), metadata=meta()
        )
    )
    assert [i.digest for b in only for i in b.info] == [target]
    error = error_of(
        lambda: stub.Update(
            pb.UpdateRequest(
                info=pb.Info(digest=target), update_mask=field_mask_pb2.FieldMask(paths=["size"])
            ),
            metadata=meta(),
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    stub.Delete(pb.DeleteContentRequest(digest=target), metadata=meta())
    error = error_of(lambda: stub.Delete(pb.DeleteContentRequest(digest=target), metadata=meta()))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == f"content digest {target}: not found"


def test_leased_writes_are_recorded_on_the_lease(channel, stub):
    leases = leases_pb2_grpc.LeasesStub(channel)
    lease = leases.Create(leases_pb2.CreateRequest(id="pull-1"), metadata=meta()).lease
    stream = WriteStream(stub, lease=lease.id)
    stream.send(action=pb.STAT, ref="layer-sha256:1", total=4)
    stream.send(action=pb.WRITE, offset=0, data=b"data")
    resources = leases.ListResources(leases_pb2.ListResourcesRequest(id="pull-1"), metadata=meta())
    assert [(r.type, r.id) for r in resources.resources] == [("ingests", "layer-sha256:1")]
    stream.send(action=pb.COMMIT, total=4, offset=4)
    stream.close()
    resources = leases.ListResources(leases_pb2.ListResourcesRequest(id="pull-1"), metadata=meta())
    assert [(r.type, r.id) for r in resources.resources] == [("content", sha(b"data"))]
    # A lease that does not exist is refused.
    stream = WriteStream(stub, lease="missing")
    error = error_of(lambda: stream.send(action=pb.STAT, ref="x"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_kill_during_a_write_then_resume(daemon, stub):
    data = os.urandom(3 * MIB)
    half = len(data) // 2
    stream = WriteStream(stub)
    stream.send(action=pb.STAT, ref="layer-big", total=len(data), expected=sha(data))
    stream.send(action=pb.WRITE, offset=0, data=data[:MIB])
    stream.send(action=pb.WRITE, offset=MIB, data=data[MIB:half])
    daemon.process.kill()  # SIGKILL with the stream open
    daemon.process.wait(timeout=15)
    daemon.start()
    with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
        stub = pb_grpc.ContentStub(channel)
        error = error_of(lambda: stub.Info(pb.InfoRequest(digest=sha(data)), metadata=meta()))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert list(stub.List(pb.ListContentRequest(), metadata=meta())) == []
        assert os.listdir(daemon.root / CONTENT_ROOT / "blobs" / "sha256") == []
        status = stub.Status(pb.StatusRequest(ref="layer-big"), metadata=meta()).status
        assert (status.offset, status.total, status.expected) == (half, len(data), sha(data))
        resumed = WriteStream(stub)
        stat = resumed.send(action=pb.STAT, ref="layer-big", total=len(data), expected=sha(data))
        assert (stat.offset, stat.digest) == (half, sha(data[:half]))
        offset = stat.offset
        while offset < len(data):
            offset = resumed.send(action=pb.WRITE, offset=offset, data=data[offset : offset + MIB]).offset
        done = resumed.send(action=pb.COMMIT, total=len(data), offset=offset, expected=sha(data))
        resumed.close()
        assert (done.offset, done.digest) == (len(data), sha(data))
        assert b"".join(r.data for r in read(stub, sha(data))) == data
