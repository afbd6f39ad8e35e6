"""A full disk: the daemon's root on a small loop-mounted ext4 filesystem (96 MiB).

* an import of an image larger than the free space fails with RESOURCE_EXHAUSTED naming "no
  space left on device" and what was being written; the store is intact (the invariant
  checker), the space is back right after the failure (the partial ingest is dropped, not kept
  for a resume: a resume cannot succeed on a full disk and would keep it full), and a smaller
  import then succeeds on the same daemon;
* a layer that fits compressed but not unpacked fails the same way during the apply, leaving no
  snapshot; its blobs go with the next collection (they were held only by the import's lease);
* a container filling its own writable snapshot gets ENOSPC itself; the daemon and its store
  are unaffected, and removing the container gives the space back.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from crash.invariants import Stubs, check_store, cleanup, ingest_dir, leaks, md
from fixtures.archives import oci_archive
from fixtures.images import build_image, busybox_image, busybox_layer, layer_tar, push_image, random_bytes
from fixtures.tasks import PROCESS_URL, TaskRig, reap_leftovers, unique_namespace
from google.protobuf import any_pb2

from runtimed.api.runtimed.services.transfer.v1 import transfer_pb2, transfer_pb2_grpc
from runtimed.remotes import RegistryClient

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop mounts)"),
]

FS_SIZE = 96 << 20
CHUNK = 1 << 20


@pytest.fixture
def small_disk_daemon(daemon_factory) -> Iterator:
    """A daemon whose root is a fresh 96 MiB ext4 filesystem; unmounted (and the loop device
    detached: mount -o loop sets autoclear) after the test."""
    daemon = daemon_factory()
    image = Path(tempfile.mkstemp(prefix="rtd-disk-", suffix=".img", dir="/tmp")[1])
    subprocess.run(["truncate", "-s", str(FS_SIZE), str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-F", "-q", "-m", "0", str(image)], check=True, capture_output=True)
    daemon.root.mkdir(parents=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(daemon.root)], check=True)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.kill()
        reap_leftovers(daemon.state, [])
        for mountpoint in sorted(_mounts_under(daemon.root), reverse=True):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True)
        image.unlink(missing_ok=True)


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        return [line.split()[4] for line in mountinfo if line.split()[4].startswith(str(path))]


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def wait_for_space(daemon, before: int, timeout: float = 10.0) -> None:
    """Free space back to `before` (within 1 MiB), from the collection a failure scheduled."""
    deadline = time.monotonic() + timeout
    while abs(free_bytes(daemon.root) - before) >= 1 << 20:
        assert time.monotonic() < deadline, f"{(before - free_bytes(daemon.root)) >> 10} KiB not given back"
        time.sleep(0.1)


def import_archive(daemon, namespace: str, data: bytes) -> str:
    stubs = Stubs(daemon.address)
    try:
        transfer = transfer_pb2_grpc.TransferStub(stubs.channel)

        def requests():
            yield transfer_pb2.ImportRequest(options=transfer_pb2.ImportOptions(unpack=True))
            for start in range(0, len(data), CHUNK):
                yield transfer_pb2.ImportRequest(data=data[start : start + CHUNK])

        last = None
        for progress in transfer.Import(requests(), metadata=md(namespace), timeout=120):
            last = progress
        return last.image.name
    finally:
        stubs.close()


def assert_intact(daemon) -> None:
    problems = check_store(daemon)
    assert not problems, "\n".join(problems)


def test_import_larger_than_the_disk(small_disk_daemon):
    daemon = small_disk_daemon
    before = free_bytes(daemon.root)
    big = layer_tar({"big.bin": random_bytes(FS_SIZE + (16 << 20), seed=1)}, busybox=False)
    image = build_image([big], compress=False)
    with pytest.raises(grpc.RpcError) as failure:
        import_archive(daemon, "full", oci_archive([("docker.io/library/big:v1", image)]))
    error = failure.value
    print(error.code(), error.details())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert "no space left on device" in error.details().lower()
    assert image.layers[0].digest[7:] in error.details(), "the error names what was being written"
    assert_intact(daemon)
    assert not os.listdir(ingest_dir(daemon)), "the partial blob of a full disk is not kept"
    after = free_bytes(daemon.root)
    assert abs(after - before) < 1 << 20, f"{(before - after) >> 10} KiB not given back"
    # The same daemon goes on: a smaller image imports and unpacks.
    name = import_archive(daemon, "full", oci_archive([("docker.io/library/small:v1", busybox_image())]))
    assert name == "docker.io/library/small:v1"
    assert_intact(daemon)
    cleanup(daemon)
    assert not leaks(daemon)
    assert abs(free_bytes(daemon.root) - before) < 1 << 20


def pull(daemon, namespace: str, ref: str) -> str:
    stubs = Stubs(daemon.address)
    try:
        transfer = transfer_pb2_grpc.TransferStub(stubs.channel)
        request = transfer_pb2.PullRequest(
            reference=ref, unpack=True, registry=transfer_pb2.RegistryOptions(plain_http=True)
        )
        last = None
        for progress in transfer.Pull(request, metadata=md(namespace), timeout=120):
            last = progress
        return last.image.name
    finally:
        stubs.close()


def test_pull_larger_than_the_disk(small_disk_daemon, registry):
    daemon = small_disk_daemon
    before = free_bytes(daemon.root)
    big = layer_tar({"big.bin": random_bytes(FS_SIZE + (16 << 20), seed=2)}, busybox=False)
    image = build_image([busybox_layer(), big], compress=False)
    ref = registry.ref(f"full/big{os.getpid()}", "v1")
    small = registry.ref(f"full/small{os.getpid()}", "v1")

    async def push() -> None:
        async with RegistryClient() as client:
            await push_image(client, ref, image)
            await push_image(client, small, busybox_image())

    asyncio.run(push())
    with pytest.raises(grpc.RpcError) as failure:
        pull(daemon, "pull", ref)
    error = failure.value
    print(error.code(), error.details())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert "no space left on device" in error.details().lower()
    assert image.layers[1].digest in error.details(), "the error names what was being written"
    assert_intact(daemon)
    assert not os.listdir(ingest_dir(daemon)), "the partial blob of a full disk is not kept"
    # The layers and documents it fetched completely were held only by its lease: the failed
    # pull's lease deletion schedules a collection, which gives their space back.
    wait_for_space(daemon, before)
    assert pull(daemon, "pull", small) == small
    assert_intact(daemon)
    cleanup(daemon)
    assert not leaks(daemon)


def test_layer_that_does_not_fit_unpacked(small_disk_daemon):
    daemon = small_disk_daemon
    before = free_bytes(daemon.root)
    zeros = layer_tar({"zeros.bin": bytes(FS_SIZE + (16 << 20))}, busybox=False)  # gzips to ~100 KiB
    image = build_image([zeros])
    with pytest.raises(grpc.RpcError) as failure:
        import_archive(daemon, "unpack", oci_archive([("docker.io/library/zeros:v1", image)]))
    error = failure.value
    print(error.code(), error.details())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert "no space left on device" in error.details().lower()
    assert image.layers[0].digest in error.details() and "unpacking" in error.details()
    assert_intact(daemon)
    wait_for_space(daemon, before)  # the blobs were held only by the failed import's lease
    assert not leaks(daemon)
    name = import_archive(daemon, "unpack", oci_archive([("docker.io/library/small:v1", busybox_image())]))
    assert name == "docker.io/library/small:v1"
    assert_intact(daemon)


def test_container_filling_its_snapshot(small_disk_daemon, tmp_path):
    daemon = small_disk_daemon
    namespace = unique_namespace("full")
    before = free_bytes(daemon.root)
    rig = TaskRig(daemon.address, namespace, tmp_path)
    try:
        fill = "i=0; while cat /bin/busybox >> /f$((i / 16)); do i=$((i + 1)); done; touch /full; sleep 300"
        rig.container("filler", ["sh", "-c", fill])
        rig.create_task("filler")
        rig.start("filler")
        deadline = time.monotonic() + 60
        while free_bytes(daemon.root) > 1 << 20:
            assert time.monotonic() < deadline, "the container never filled the disk"
            time.sleep(0.1)
        time.sleep(0.3)
        # While the disk is full: the store reads fine, and a write is refused clearly (or
        # squeezes into space SQLite already holds), never an internal error.
        assert_intact(daemon)
        try:
            rig.container("while-full", ["true"])
            squeezed = True
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
            assert "no space left on device" in exc.details()
            squeezed = False
        print("a container create on the full disk", "succeeded" if squeezed else "was refused")
        # The container frees its space (an exec: the shim's files are in the state dir).
        stubs = Stubs(daemon.address)
        try:
            from runtimed.api.containerd.services.tasks.v1 import tasks_pb2

            process = {
                "args": ["sh", "-c", "rm -f /f*"],
                "cwd": "/",
                "env": ["PATH=/bin"],
                "user": {"uid": 0, "gid": 0},
            }
            spec = any_pb2.Any(type_url=PROCESS_URL, value=json.dumps(process).encode())
            request = tasks_pb2.ExecProcessRequest(container_id="filler", exec_id="free", spec=spec)
            stubs.tasks.Exec(request, metadata=md(namespace), timeout=30)
            rig.start("filler", "free")
            assert rig.wait("filler", "free") == 0
        finally:
            stubs.close()
        rig.kill("filler")
        assert rig.wait("filler") == 137
        assert_intact(daemon)
    finally:
        rig.close()
        cleanup(daemon, [namespace])
    assert not leaks(daemon, [namespace])
    assert abs(free_bytes(daemon.root) - before) < 1 << 20


def test_removing_the_container_that_filled_the_disk(small_disk_daemon, tmp_path):
    """The usual way out of a full disk: kill the container that filled it and remove it with
    its snapshot, while the disk is still full (the snapshotter's row cannot be deleted until
    the snapshot's files are gone; it empties the snapshot first)."""
    daemon = small_disk_daemon
    namespace = unique_namespace("fill")
    before = free_bytes(daemon.root)
    rig = TaskRig(daemon.address, namespace, tmp_path)
    try:
        fill = "i=0; while cat /bin/busybox >> /f$((i / 16)); do i=$((i + 1)); done; sleep 300"
        rig.container("filler", ["sh", "-c", fill])
        rig.create_task("filler")
        rig.start("filler")
        deadline = time.monotonic() + 60
        while free_bytes(daemon.root) > 1 << 20:
            assert time.monotonic() < deadline, "the container never filled the disk"
            time.sleep(0.1)
        time.sleep(0.3)
        rig.kill("filler")
        assert rig.wait("filler") == 137
        rig.delete_task("filler")
        rig.remove_container("filler")  # Containers.Delete, then Snapshots.Remove on the full disk
        assert free_bytes(daemon.root) > 64 << 20
        assert_intact(daemon)
    finally:
        rig.close()
        cleanup(daemon, [namespace])
    assert not leaks(daemon, [namespace])
    assert abs(free_bytes(daemon.root) - before) < 1 << 20
