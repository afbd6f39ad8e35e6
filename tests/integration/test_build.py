"""runtimectl build against a real daemon and real runc (root only)."""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.build import BUSYBOX, Builder
from fixtures.tasks import TASK_STATE, mounts_under, reap_leftovers

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, mounts)"),
]

APP = """\
FROM busybox:local
WORKDIR /app
COPY run.sh .
RUN echo "built by RUN" > /app/built.txt && echo "side effect $((40+2))"
CMD ["sh", "/app/run.sh"]
"""


@pytest.fixture
def rt(daemon, tmp_path) -> Iterator[Builder]:
    builder = Builder(daemon, tmp_path)
    builder.import_busybox()
    yield builder
    leftovers = reap_leftovers(daemon.state, [builder.namespace])
    builder.close()
    assert not leftovers, f"test left {leftovers}"
    assert not [m for m in mounts_under(Path("/tmp")) if "runtimed-mount-" in m]


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return directory


def app_context(tmp_path: Path) -> Path:
    return write(
        tmp_path / "app",
        {"Dockerfile": APP, "run.sh": 'echo "hello from app"; cat /app/built.txt; pwd\n'},
    )


def test_walkthrough_build_run_rebuild_cached_then_invalidated(rt, tmp_path, daemon):
    context = app_context(tmp_path)
    first = rt.build(context, "-t", "app:v1")
    assert first.returncode == 0, (first.stdout, first.stderr)
    out = first.stdout
    assert "Step 1/5 : FROM busybox:local" in out
    assert "Step 4/5 : RUN" in out and "side effect 42" in out
    assert re.search(r"Successfully built [0-9a-f]{12}\n", out)
    assert out.rstrip().endswith("Successfully tagged app:v1")
    assert rt.image_names() == ["docker.io/library/app:v1", BUSYBOX]

    manifest, config = rt.documents("docker.io/library/app:v1")
    digest = rt.image("docker.io/library/app:v1").target.digest
    assert config["config"]["Cmd"] == ["sh", "/app/run.sh"]
    assert config["config"]["WorkingDir"] == "/app"
    assert len(config["rootfs"]["diff_ids"]) == len(manifest["layers"]) == 4  # busybox, WORKDIR, COPY, RUN
    created_by = [h["created_by"] for h in config["history"]]
    assert created_by[-1] == 'CMD ["sh", "/app/run.sh"]' and config["history"][-1]["empty_layer"]

    assert rt.run_image("docker.io/library/app:v1") == (0, "hello from app\nbuilt by RUN\n/app\n")

    # Unchanged: every step from cache, no RUN executed, the same image.
    again = rt.build(context, "-t", "app:v1")
    assert again.returncode == 0, again.stderr
    assert "side effect 42" not in again.stdout and "Running in" not in again.stdout
    assert again.stdout.count(" ---> Using cache") == 3
    assert rt.image("docker.io/library/app:v1").target.digest == digest
    assert rt.documents("docker.io/library/app:v1") == (manifest, config)

    # A changed copied file: WORKDIR still cached, COPY and RUN run again.
    (context / "run.sh").write_text('echo "hello again"\n')
    changed = rt.build(context, "-t", "app:v1")
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout.count(" ---> Using cache") == 1 and "side effect 42" in changed.stdout
    assert rt.documents("docker.io/library/app:v1")[0] != manifest
    assert rt.run_image("docker.io/library/app:v1", container_id="run2") == (0, "hello again\n")
    assert rt.containers() == []
    assert not mounts_under(daemon.state / TASK_STATE)


def test_no_cache_runs_everything_again(rt, tmp_path):
    context = app_context(tmp_path)
    assert rt.build(context, "-t", "app:v1").returncode == 0
    result = rt.build(context, "--no-cache", "-t", "app:v2")
    assert result.returncode == 0, result.stderr
    assert "Using cache" not in result.stdout and "side effect 42" in result.stdout
