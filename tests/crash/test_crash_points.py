"""kill -9 the daemon at many points of many operations; after each kill a restart on the same
root and state must find a consistent store (tests/crash/invariants.py) and nothing may leak.

Operations and how the moment of the kill varies (seeded: every run kills at the same points):

* a content write, half-sent: the kill comes right after the daemon acknowledged chunk k of 16
  (k stepped); the ingest must resume from exactly k chunks and commit to the right digest;
* a content commit: the kill comes 0-15 ms after the COMMIT was sent;
* an image import with unpack of a many-file layer (Transfer.Import, so Diff apply too): the
  kill comes at stepped fractions of the time an uninterrupted import takes here;
* an image pull from a local registry (with unpack): likewise;
* container creates (snapshot + Containers.Create) in a loop, killed at random delays;
* task create/start/kill/delete in a loop, killed at random delays, with a sentinel task that
  must stay RUNNING (same pid) and exec-able across every kill;
* a garbage collection removing hundreds of blobs and snapshots, killed at random delays.

After the loop of each test everything is removed through the API, a collection runs, and no
mount, shim, cgroup, ingest, staging directory or temporary file may be left.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from crash.invariants import (
    RunningTask,
    Stubs,
    check_store,
    cleanup,
    collect,
    import_image,
    layer_tree,
    leaks,
    md,
    run_from_image,
)
from fixtures.archives import oci_archive
from fixtures.images import build_image, busybox_layer, layer_tar, random_bytes, sha256
from fixtures.tasks import TaskRig, reap_leftovers, unique_namespace

from runtimed.api.containerd.services.content.v1 import content_pb2
from runtimed.api.containerd.services.images.v1 import images_pb2
from runtimed.api.containerd.services.leases.v1 import leases_pb2
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2
from runtimed.api.containerd.types import descriptor_pb2
from runtimed.api.runtimed.services.transfer.v1 import transfer_pb2, transfer_pb2_grpc
from runtimed.images.manifest import chain_ids

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (overlay mounts, runc)"),
]

SEED = 20261128
CHUNK = 256 * 1024
ROOT = {"containerd.io/gc.root": "1"}  # kept by the start-up collection of each restart


@pytest.fixture
def crash_daemon(daemon_factory) -> Iterator:
    daemon = daemon_factory().start()
    yield daemon
    daemon.kill()
    reap_leftovers(daemon.state, [])


def assert_consistent(daemon, **kwargs) -> None:
    problems = check_store(daemon, **kwargs)
    assert not problems, "store inconsistent after kill -9:\n" + "\n".join(problems)


def assert_no_leaks(daemon, namespaces=()) -> None:
    cleanup(daemon)
    found = leaks(daemon, namespaces)
    assert not found, f"left after cleanup: {found}"


def kill_during(daemon, action: Callable[[], object], delay: float) -> dict:
    """Run action in a thread, kill -9 the daemon after delay, restart it; what the action got."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = action()
        except grpc.RpcError as exc:
            outcome["error"] = exc.code()

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(delay)
    daemon.kill()
    thread.join(60)
    assert not thread.is_alive(), "the client call did not end when the daemon died"
    daemon.start()
    return outcome


# -- content -----------------------------------------------------------------------------------


class WriteStream:
    """A Content.Write call driven one request at a time (each request gets its response)."""

    def __init__(self, stubs: Stubs, namespace: str) -> None:
        self._requests: queue.Queue = queue.Queue()

        def requests():
            while (item := self._requests.get()) is not None:
                yield item

        self._call = stubs.content.Write(requests(), metadata=md(namespace), timeout=60)

    def send(self, request) -> None:
        self._requests.put(request)

    def ask(self, request):
        self.send(request)
        return next(self._call)

    def close(self) -> None:
        self._requests.put(None)
        with contextlib.suppress(grpc.RpcError, StopIteration):
            self._call.cancel()


def finish_write(stubs: Stubs, namespace: str, ref: str, data: bytes) -> None:
    """Resume the ingest of ref from wherever it is and commit it (or find the blob committed)."""
    digest = sha256(data)
    stream = WriteStream(stubs, namespace)
    try:
        status = stream.ask(
            content_pb2.WriteContentRequest(action=content_pb2.STAT, ref=ref, total=len(data))
        )
        offset = status.offset
        assert 0 <= offset <= len(data) and status.digest == sha256(data[:offset]), (
            f"resumed ingest {ref}: offset {offset}, digest {status.digest} is not a prefix of what was sent"
        )
        reply = stream.ask(
            content_pb2.WriteContentRequest(
                action=content_pb2.COMMIT,
                offset=offset,
                data=data[offset:],
                total=len(data),
                expected=digest,
                labels=ROOT,
            )
        )
        assert reply.digest == digest
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.ALREADY_EXISTS, exc
    finally:
        stream.close()


def test_kill_during_content_writes_and_commits(crash_daemon):
    daemon = crash_daemon
    rng = random.Random(SEED)
    namespace = "crash-content"
    blobs: dict[str, bytes] = {}
    # Half-sent: killed after the daemon acknowledged chunk k (0 = right after the STAT).
    for k in (0, 1, 3, 6, 10, 15):
        data = random_bytes(16 * CHUNK, seed=k)
        ref = f"half-{k}"
        stubs = Stubs(daemon.address)
        stream = WriteStream(stubs, namespace)
        stream.ask(content_pb2.WriteContentRequest(action=content_pb2.STAT, ref=ref, total=len(data)))
        for i in range(k):
            chunk = data[i * CHUNK : (i + 1) * CHUNK]
            reply = stream.ask(
                content_pb2.WriteContentRequest(action=content_pb2.WRITE, offset=i * CHUNK, data=chunk)
            )
            assert reply.offset == (i + 1) * CHUNK
        daemon.kill()
        stream.close()
        stubs.close()
        daemon.start()
        assert_consistent(daemon)
        stubs = Stubs(daemon.address)
        listed = {
            i.digest
            for r in stubs.content.List(content_pb2.ListContentRequest(), metadata=md(namespace))
            for i in r.info
        }
        assert sha256(data) not in listed, "a half-sent blob is listed as content"
        statuses = {
            s.ref: s.offset
            for s in stubs.content.ListStatuses(
                content_pb2.ListStatusesRequest(), metadata=md(namespace)
            ).statuses
        }
        assert statuses.get(ref, 0) == k * CHUNK, (
            f"the ingest kept {statuses.get(ref)} of {k * CHUNK} acknowledged bytes"
        )
        finish_write(stubs, namespace, ref, data)
        stubs.close()
        blobs[sha256(data)] = data
    # At commit: killed 0-15 ms after the COMMIT went out (before, during or after the rename).
    for attempt in range(5):
        data = random_bytes(16 * CHUNK, seed=100 + attempt)
        ref = f"commit-{attempt}"
        stubs = Stubs(daemon.address)
        stream = WriteStream(stubs, namespace)
        stream.ask(content_pb2.WriteContentRequest(action=content_pb2.STAT, ref=ref, total=len(data)))
        stream.ask(content_pb2.WriteContentRequest(action=content_pb2.WRITE, offset=0, data=data[:-CHUNK]))
        stream.send(
            content_pb2.WriteContentRequest(
                action=content_pb2.COMMIT,
                offset=len(data) - CHUNK,
                data=data[-CHUNK:],
                total=len(data),
                expected=sha256(data),
                labels=ROOT,
            )
        )
        time.sleep(rng.uniform(0, 0.015))
        daemon.kill()
        stream.close()
        stubs.close()
        daemon.start()
        assert_consistent(daemon)
        stubs = Stubs(daemon.address)
        finish_write(stubs, namespace, ref, data)
        stubs.close()
        blobs[sha256(data)] = data
    assert_consistent(daemon)
    stubs = Stubs(daemon.address)
    listed = {
        i.digest
        for r in stubs.content.List(content_pb2.ListContentRequest(), metadata=md(namespace))
        for i in r.info
    }
    assert set(blobs) <= listed
    for digest in blobs:  # gc.root-less, unleased: the next collection takes them all
        stubs.content.Delete(content_pb2.DeleteContentRequest(digest=digest), metadata=md(namespace))
    stubs.close()
    assert_no_leaks(daemon)


# -- layers: import (with unpack) and pull ------------------------------------------------------


def many_files_image():
    files = {f"data/d{i // 100:02}/f{i:04}.txt": f"file {i}\n".encode() * 8 for i in range(1500)}
    layers = [busybox_layer(), layer_tar(files, busybox=False)]
    return build_image(layers, cmd=("true",)), layers


def pull_image(daemon, namespace: str, ref: str) -> str:
    stubs = Stubs(daemon.address)
    try:
        transfer = transfer_pb2_grpc.TransferStub(stubs.channel)
        request = transfer_pb2.PullRequest(
            reference=ref, unpack=True, registry=transfer_pb2.RegistryOptions(plain_http=True)
        )
        last = None
        for progress in transfer.Pull(request, metadata=md(namespace), timeout=120):
            last = progress
        assert last is not None and last.event == "done", last
        return last.image.name
    finally:
        stubs.close()


def image_names(daemon, namespace: str) -> set[str]:
    stubs = Stubs(daemon.address)
    try:
        return {
            i.name for i in stubs.images.List(images_pb2.ListImagesRequest(), metadata=md(namespace)).images
        }
    finally:
        stubs.close()


def stepped_kills(
    daemon, operation: Callable[[str], object], trees, name: str, iterations: int, tmp_path
) -> None:
    """Time one uninterrupted run, then kill at stepped fractions of that time, each in a fresh
    namespace (so every run does the whole work); after each: the invariants, the image (if
    recorded) runs, and the operation run again completes."""
    started = time.monotonic()
    operation("crash-warm")
    duration = time.monotonic() - started
    assert_consistent(daemon, trees=trees)
    outcomes = []
    for i in range(iterations):
        namespace = f"crash-{i}"
        delay = duration * (i + 0.5) / iterations
        outcome = kill_during(daemon, lambda ns=namespace: operation(ns), delay)
        outcomes.append("done" if "result" in outcome else outcome.get("error"))
        assert_consistent(daemon, trees=trees)
        if name in image_names(daemon, namespace):
            assert run_from_image(daemon, namespace, name, tmp_path) == 0
        operation(namespace)  # retried after the crash: completes
        assert name in image_names(daemon, namespace)
    assert_consistent(daemon, trees=trees)
    assert run_from_image(daemon, f"crash-{iterations - 1}", name, tmp_path) == 0
    print(f"kills at {duration:.2f}s-scaled steps: {outcomes}")
    assert_no_leaks(daemon)


def test_kill_during_import_and_unpack_of_a_many_file_layer(crash_daemon, tmp_path):
    image, layers = many_files_image()
    name = "docker.io/library/crash:import"
    data = oci_archive([(name, image)])
    chains = chain_ids(list(image.diff_ids))
    trees = {chain: layer_tree(layer) for chain, layer in zip(chains, layers, strict=True)}
    stepped_kills(crash_daemon, lambda ns: import_image(crash_daemon, ns, data), trees, name, 5, tmp_path)


async def test_kill_during_pull(crash_daemon, registry, tmp_path):
    from fixtures.images import push_image

    from runtimed.remotes import RegistryClient

    image, layers = many_files_image()
    big = layer_tar({"big/blob.bin": random_bytes(8 << 20, seed=3)}, busybox=False)
    image = build_image([*layers, big], cmd=("true",))
    ref = registry.ref(f"crash/pull{os.getpid()}", "v1")
    async with RegistryClient() as client:
        await push_image(client, ref, image)
    chains = chain_ids(list(image.diff_ids))
    trees = {chain: layer_tree(layer) for chain, layer in zip(chains, [*layers, big], strict=True)}
    import asyncio

    await asyncio.to_thread(
        stepped_kills, crash_daemon, lambda ns: pull_image(crash_daemon, ns, ref), trees, ref, 5, tmp_path
    )


# -- containers and tasks -----------------------------------------------------------------------


def test_kill_during_container_creates(crash_daemon, tmp_path):
    daemon = crash_daemon
    rng = random.Random(SEED + 1)
    namespace = unique_namespace("cc")
    made = 0
    setup = TaskRig(daemon.address, namespace, tmp_path)
    setup.base_snapshot()  # the busybox snapshot every container is prepared from
    setup.channel.close()  # its lease stays: the base must outlive the crashes
    for attempt in range(4):
        rig = TaskRig(daemon.address, namespace, tmp_path)
        rig._has_base = True

        def loop(rig: TaskRig = rig, attempt: int = attempt) -> None:
            nonlocal made
            i = 0
            while True:
                rig.container(f"c{attempt}-{i}", ["true"])
                made += 1
                i += 1

        outcome = kill_during(daemon, loop, rng.uniform(0.2, 0.8))
        assert outcome.get("error") in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, None), outcome
        rig.channel.close()
        assert_consistent(daemon)
    assert made > 4, "the loop never got going"
    assert_no_leaks(daemon, [namespace])


def test_kill_during_task_start_and_delete(crash_daemon, tmp_path):
    daemon = crash_daemon
    rng = random.Random(SEED + 2)
    namespace = unique_namespace("ct")
    rig = TaskRig(daemon.address, namespace, tmp_path)
    rig.container("sentinel", ["sleep", "300"])
    rig.create_task("sentinel")
    sentinel = RunningTask(namespace, "sentinel", rig.start("sentinel"))
    rig.channel.close()  # its lease stays: the base snapshot must outlive the crashes
    steps: list[str] = []
    try:
        for attempt in range(5):
            rig = TaskRig(daemon.address, namespace, tmp_path)
            rig._has_base = True

            def loop(rig: TaskRig = rig, attempt: int = attempt) -> None:
                i = 0
                while True:
                    cid = f"t{attempt}-{i}"
                    rig.container(cid, ["sleep", "100"])
                    steps.append("created")
                    rig.create_task(cid)
                    rig.start(cid)
                    steps.append("started")
                    rig.kill(cid)
                    rig.wait(cid)
                    rig.delete_task(cid)
                    steps.append("deleted")
                    rig.remove_container(cid)
                    i += 1

            kill_during(daemon, loop, rng.uniform(0.1, 1.2))
            rig.channel.close()
            assert_consistent(daemon, running=[sentinel])
        assert "started" in steps and "deleted" in steps, steps
    finally:
        with contextlib.suppress(Exception):
            cleanup(daemon, [namespace])
    found = leaks(daemon, [namespace])
    reap_leftovers(daemon.state, [namespace])
    assert not found, f"left after cleanup: {found}"


# -- garbage collection -------------------------------------------------------------------------


def test_kill_during_garbage_collection(crash_daemon):
    daemon = crash_daemon
    rng = random.Random(SEED + 3)
    namespace = "crash-gc"
    for attempt in range(3):
        stubs = Stubs(daemon.address)
        m = md(namespace)
        labels = {}
        for i in range(200):
            data = f"{attempt}-{i}".encode()
            reply_ref = f"b-{attempt}-{i}"
            requests = iter(
                [
                    content_pb2.WriteContentRequest(action=content_pb2.STAT, ref=reply_ref, total=len(data)),
                    content_pb2.WriteContentRequest(action=content_pb2.COMMIT, data=data, total=len(data)),
                ]
            )
            list(stubs.content.Write(requests, metadata=m))
            labels[f"containerd.io/gc.ref.content.l.{i}"] = sha256(data)
        for i in range(20):
            key = f"active-{attempt}-{i}"
            stubs.snapshots.Prepare(
                snapshots_pb2.PrepareSnapshotRequest(snapshotter="overlayfs", key=key), metadata=m
            )
            stubs.snapshots.Commit(
                snapshots_pb2.CommitSnapshotRequest(
                    snapshotter="overlayfs", name=f"s-{attempt}-{i}", key=key
                ),
                metadata=m,
            )
            labels[f"containerd.io/gc.ref.snapshot.overlayfs/{i}"] = f"s-{attempt}-{i}"
        manifest = f"manifest {attempt}".encode()
        requests = iter(
            [
                content_pb2.WriteContentRequest(
                    action=content_pb2.STAT, ref=f"m-{attempt}", total=len(manifest)
                ),
                content_pb2.WriteContentRequest(
                    action=content_pb2.COMMIT, data=manifest, total=len(manifest), labels=labels
                ),
            ]
        )
        list(stubs.content.Write(requests, metadata=m))
        target = images_pb2.Image(
            name="doomed",
            target=descriptor_pb2.Descriptor(
                media_type="application/vnd.oci.image.manifest.v1+json",
                digest=sha256(manifest),
                size=len(manifest),
            ),
        )
        stubs.images.Create(images_pb2.CreateImageRequest(image=target), metadata=m)
        stubs.close()

        def delete(m: list = m) -> None:
            s = Stubs(daemon.address)
            try:
                s.images.Delete(
                    images_pb2.DeleteImageRequest(name="doomed", sync=True), metadata=m, timeout=60
                )
            finally:
                s.close()

        kill_during(daemon, delete, rng.uniform(0.0, 0.25))
        assert_consistent(daemon)
        stubs = Stubs(daemon.address)
        if "doomed" in image_names(daemon, namespace):
            stubs.images.Delete(
                images_pb2.DeleteImageRequest(name="doomed", sync=True), metadata=m, timeout=60
            )
        else:
            collect(stubs, namespace)
        leases = stubs.leases.List(leases_pb2.ListRequest(), metadata=m).leases
        assert not leases
        stubs.close()
        assert_consistent(daemon)
    assert_no_leaks(daemon)
