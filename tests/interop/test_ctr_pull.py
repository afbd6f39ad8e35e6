"""`ctr images pull` against runtimed, and work shared both ways with runtimed's own pull.

ctr pulls client-side: it talks to the registry itself and drives our Content, Images, Leases,
Snapshots and Diff services (containerd-api.md §2.6). Both clients unpack with containerd's
chain-ID scheme, so whichever pulls second finds the snapshots and applies nothing.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from fixtures.images import build_image, busybox_layer, layer_tar, push_image, random_bytes

from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from runtimed.images.manifest import chain_ids
from runtimed.remotes import RegistryClient
from runtimed.wire import NAMESPACE_KEY

pytestmark = pytest.mark.root

REPO_ROOT = Path(__file__).resolve().parents[2]
DIFF_APPLY = "/containerd.services.diff.v1.Diff/Apply"


def three_layer_image():
    files = {f"data/{i:03}.bin": random_bytes(1024, seed=i) for i in range(300)}
    return build_image(
        [
            busybox_layer(),
            layer_tar(files, busybox=False),
            layer_tar({"data/.wh.000.bin": b"", "etc/motd": b"hi\n"}, busybox=False),
        ]
    )


async def pushed(registry, image) -> str:
    ref = registry.ref(f"interop/{uuid.uuid4().hex[:10]}", "v1")
    async with RegistryClient() as client:
        await push_image(client, ref, image)
    return ref


def runtimectl(daemon, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "runtimed.cli.main", "-a", daemon.address, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def created_at(daemon, chains: list[str]) -> dict[str, tuple[int, int]]:
    """Each snapshot's created_at: unchanged means nobody unpacked it again."""
    with daemon.client() as client:
        stub = snapshots_pb2_grpc.SnapshotsStub(client.channel)
        stamps = {}
        for chain in chains:
            request = snapshots_pb2.StatSnapshotRequest(snapshotter="overlayfs", key=chain)
            info = stub.Stat(request, metadata=[(NAMESPACE_KEY, "default")]).info
            assert info.kind == snapshots_pb2.COMMITTED
            stamps[chain] = (info.created_at.seconds, info.created_at.nanos)
        return stamps


def log_since(daemon, mark: int) -> str:
    return daemon.log()[mark:]


async def test_ctr_pull_then_runtimed_pull_reuses_snapshots(daemon, registry, run_ctr):
    image = three_layer_image()
    ref = await pushed(registry, image)
    chains = chain_ids(list(image.diff_ids))

    mark = len(daemon.log())
    result = run_ctr(daemon.address, "images", "pull", "--plain-http", ref, timeout=120)
    assert "done" in result.stdout
    assert log_since(daemon, mark).count(DIFF_APPLY) == len(chains)  # ctr unpacked through our Diff

    listed = run_ctr(daemon.address, "images", "ls").stdout
    assert re.search(
        rf"^{re.escape(ref)}\s+application/vnd.oci.image.manifest.v1\+json\s+{image.manifest.digest}",
        listed,
        re.M,
    ), listed
    snapshots = run_ctr(daemon.address, "snapshots", "ls").stdout
    for chain in chains:
        assert re.search(rf"^{chain}\s.*Committed", snapshots, re.M), snapshots
    content = run_ctr(daemon.address, "content", "ls").stdout
    assert f"containerd.io/gc.ref.snapshot.overlayfs={chains[-1]}" in content
    stamps = created_at(daemon, chains)

    mark = len(daemon.log())
    out = runtimectl(daemon, "pull", ref)
    assert out.count("Already unpacked") == len(chains)
    assert out.count("Already exists") == 2 + len(chains)  # manifest, config, layers
    assert created_at(daemon, chains) == stamps
    assert "layer applied" not in log_since(daemon, mark)


async def test_runtimed_pull_then_ctr_pull_applies_nothing(daemon, registry, run_ctr):
    image = three_layer_image()
    ref = await pushed(registry, image)
    chains = chain_ids(list(image.diff_ids))
    runtimectl(daemon, "pull", ref)
    stamps = created_at(daemon, chains)

    mark = len(daemon.log())
    run_ctr(daemon.address, "images", "pull", "--plain-http", ref, timeout=120)
    assert DIFF_APPLY not in log_since(daemon, mark)
    assert created_at(daemon, chains) == stamps
    # ctr sees the image runtimed recorded, with its platform read from our content.
    assert "linux/" in run_ctr(daemon.address, "images", "ls").stdout
