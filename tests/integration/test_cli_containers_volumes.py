"""`runtimectl run -v NAME:/path`: named volumes through the daemon's Volumes service (root only)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fixtures.archives import oci_archive
from fixtures.cli_images import cli_busybox
from fixtures.tasks import reap_leftovers, unique_namespace
from test_cli_containers import BUSYBOX, Runner, runner

from runtimed.wire import NAMESPACE_KEY

volumes_pb2 = pytest.importorskip("runtimed.api.runtimed.services.volumes.v1.volumes_pb2")
volumes_pb2_grpc = pytest.importorskip("runtimed.api.runtimed.services.volumes.v1.volumes_pb2_grpc")

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, mounts)"),
]


@pytest.fixture
def rtctl(daemon, tmp_path) -> Iterator[Runner]:
    namespace = unique_namespace("dv")
    run = runner(daemon, namespace)
    archive = tmp_path / "images.tar"
    archive.write_bytes(oci_archive([(BUSYBOX, cli_busybox())]))
    run("import", str(archive))
    yield run
    leftovers = reap_leftovers(daemon.state, [namespace])
    assert not leftovers, f"test left {leftovers}"


def volume(daemon, namespace: str, name: str):
    with daemon.client(namespace) as client:
        stub = volumes_pb2_grpc.VolumesStub(client.channel)
        try:
            return stub.Get(
                volumes_pb2.GetVolumeRequest(name=name), metadata=[(NAMESPACE_KEY, namespace)]
            ).volume
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise


def remove_volume(daemon, namespace: str, name: str) -> None:
    with daemon.client(namespace) as client:
        stub = volumes_pb2_grpc.VolumesStub(client.channel)
        stub.Remove(volumes_pb2.RemoveVolumeRequest(name=name), metadata=[(NAMESPACE_KEY, namespace)])


def test_named_volumes_are_created_seeded_and_kept(rtctl, daemon):
    ns = rtctl.namespace
    # A new volume is seeded from the image at its mount point.
    seeded = rtctl("run", "--rm", "-v", "data:/srv/seed", "busybox", "cat", "/srv/seed/hello.txt")
    assert seeded.stdout == "from the image\n"
    made = volume(daemon, ns, "data")
    assert made is not None and made.used_by == []
    assert (Path(made.mountpoint) / "hello.txt").read_text() == "from the image\n"

    # It outlives its containers; what they write stays; an existing volume is not seeded again.
    rtctl(
        "run",
        "--rm",
        "-v",
        "data:/srv/seed",
        "busybox",
        "sh",
        "-c",
        "echo more > /srv/seed/new.txt; rm /srv/seed/hello.txt",
    )
    assert rtctl("run", "--rm", "-v", "data:/srv/seed", "busybox", "ls", "/srv/seed").stdout == "new.txt\n"
    # Another path, read-only.
    readonly = rtctl(
        "run",
        "--rm",
        "-v",
        "data:/elsewhere:ro",
        "busybox",
        "sh",
        "-c",
        "cat /elsewhere/new.txt; touch /elsewhere/x",
        check=False,
    )
    assert readonly.stdout == "more\n" and readonly.returncode != 0 and "Read-only" in readonly.stderr

    # In use while a container has it; inspect names it.
    rtctl("run", "-d", "--name", "user", "-v", "data:/data", "busybox", "sleep", "300")
    assert list(volume(daemon, ns, "data").used_by) == ["user"]
    [info] = json.loads(rtctl("inspect", "user").stdout)
    assert info["Mounts"] == [
        {
            "Type": "volume",
            "Name": "data",
            "Source": made.mountpoint,
            "Destination": "/data",
            "Mode": "rw",
            "RW": True,
        }
    ]
    with pytest.raises(grpc.RpcError) as refused:
        remove_volume(daemon, ns, "data")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    rtctl("rm", "-f", "user")
    assert volume(daemon, ns, "data") is not None  # docker rm keeps named volumes
    remove_volume(daemon, ns, "data")


def test_a_failed_run_removes_the_volume_it_made(rtctl, daemon):
    ns = rtctl.namespace
    for extra in ((), ("--rm",)):
        result = rtctl("run", *extra, "--runtime", "kata", "-v", "fresh:/x", "busybox", "true", check=False)
        assert result.returncode == 125 and '"kata"' in result.stderr
        assert volume(daemon, ns, "fresh") is None
        assert rtctl("ps", "-aq").stdout == ""
    # ...but not one that was there before.
    rtctl("run", "--rm", "-v", "kept:/x", "busybox", "true")
    assert (
        rtctl("run", "--runtime", "kata", "-v", "kept:/x", "busybox", "true", check=False).returncode == 125
    )
    assert volume(daemon, ns, "kept") is not None
    remove_volume(daemon, ns, "kept")
