"""The invariant checker catches what it is meant to: damage a healthy store by hand and see
every kind of problem reported (a checker that never fails proves nothing)."""

from __future__ import annotations

import os

import pytest
from crash.invariants import blob_dir, check_store, import_image, layer_tree, snapshot_rows, snapshotter_root
from fixtures.archives import oci_archive
from fixtures.images import build_image, busybox_layer, layer_tar

from runtimed.images.manifest import chain_ids

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (overlay)"),
]


def test_the_checker_reports_damage(daemon, tmp_path):
    layers = [busybox_layer(), layer_tar({f"d/f{i}": b"x" for i in range(50)}, busybox=False)]
    image = build_image(layers)
    name = "docker.io/library/checked:v1"
    import_image(daemon, "checked", oci_archive([(name, image)]))
    chains = chain_ids(list(image.diff_ids))
    trees = {chain: layer_tree(layer) for chain, layer in zip(chains, layers, strict=True)}
    assert check_store(daemon, trees=trees) == []

    blobs = blob_dir(daemon)
    (blobs / ("0" * 64)).write_bytes(b"half a blob")  # a torn blob renamed into place
    config = blobs / image.config.digest[7:]
    config.chmod(0o644)
    config.write_bytes(config.read_bytes()[:-1])  # a listed blob that is short
    snapshots = snapshotter_root(daemon, "overlayfs") / "snapshots"
    (snapshots / "999").mkdir()  # a directory no row names
    top = next(r for r in snapshot_rows(daemon, "overlayfs") if r["name"] == chains[1])
    os.unlink(snapshots / str(top["id"]) / "fs" / "d" / "f7")  # a committed layer, half-applied

    problems = "\n".join(check_store(daemon, trees=trees))
    assert "a half-written blob was renamed into place" in problems, problems
    assert f"content checked/{image.config.digest}" in problems and "listed" in problems, problems
    assert "snapshots/999 names no snapshot" in problems, problems
    assert f"{chains[1]}: committed but half-applied" in problems and "d/f7" in problems, problems
    assert "blob files without a record" in problems, problems
