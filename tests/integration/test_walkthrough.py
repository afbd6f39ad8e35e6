"""The walk-through of a person learning containers, through runtimectl only (issue 5):
build an image from a Dockerfile, push it to a registry, remove it, pull it back, run it; a
detached container with exec, logs, stop, rm; a bind mount; a named volume outliving containers.
Against a real daemon, real runc and a real docker-registry on loopback.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from fixtures.archives import oci_archive
from fixtures.cli import runner
from fixtures.cli_images import cli_busybox
from fixtures.tasks import mounts_under, reap_leftovers, unique_namespace

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, mounts)"),
]

DOCKERFILE = """\
FROM busybox
WORKDIR /app
COPY hello.sh .
RUN echo "built at step 4" > /app/built.txt
CMD ["sh", "/app/hello.sh"]
"""
SCRIPT = 'echo "hello from app:v1"; cat /app/built.txt; pwd\n'


def test_a_person_learning_containers(daemon, registry, tmp_path):
    namespace = unique_namespace("walk")
    rt = runner(daemon, namespace)
    try:
        archive = tmp_path / "busybox.tar"
        archive.write_bytes(oci_archive([("docker.io/library/busybox:latest", cli_busybox())]))
        rt("load", "-i", str(archive))

        # build, push, rmi, pull, run
        context = tmp_path / "app"
        context.mkdir()
        (context / "Dockerfile").write_text(DOCKERFILE)
        (context / "hello.sh").write_text(SCRIPT)
        built = rt("build", "-t", "app:v1", ".", cwd=context).stdout
        assert "Step 4/5 : RUN" in built and "Successfully tagged app:v1" in built
        remote = registry.ref(f"learn/app-{os.getpid()}", "v1")
        rt("tag", "app:v1", remote)
        rt("push", remote)
        rt("rmi", "app:v1", remote)
        assert "app" not in rt("images").stdout
        rt("pull", remote)
        expected = "hello from app:v1\nbuilt at step 4\n/app\n"
        assert rt("run", "--rm", remote).stdout == expected

        # a detached container: exec shows top as PID 1, logs, stop, rm
        assert rt("run", "-d", "--name", "demo", "busybox", "top").stdout == "demo\n"
        ps_lines = rt("exec", "demo", "ps").stdout.splitlines()
        assert any(re.match(r"\s*1\s+\S+\s+.*\btop\b", line) for line in ps_lines), ps_lines
        assert "Mem:" in rt("logs", "demo").stdout  # top's screen, kept in the container's log
        rt("stop", "demo")
        assert "Exited" in rt("ps", "-a", "--filter", "name=demo").stdout
        rt("rm", "demo")
        assert "demo" not in rt("ps", "-a").stdout

        # a bind mount leaves the file on the host
        host_dir = tmp_path / "x"
        host_dir.mkdir()
        rt("run", "--rm", "-v", f"{host_dir}:/tmp", "busybox", "sh", "-c", "date > /tmp/demo.log")
        assert (host_dir / "demo.log").read_text().strip()

        # a named volume outlives the container that wrote into it
        rt("volume", "create", "demo")
        rt("run", "--rm", "-v", "demo:/data", "busybox", "sh", "-c", "echo kept > /data/note")
        assert rt("run", "--rm", "-v", "demo:/data", "busybox", "cat", "/data/note").stdout == "kept\n"

        # bad input: clear one-line errors, docker's exit codes, nothing left behind
        in_use = rt("run", "-d", "--name", "holder", "-v", "demo:/data", "busybox", "top").stdout.strip()
        refused = rt("volume", "rm", "demo", check=False)
        assert refused.returncode == 125 and "holder" in refused.stderr, refused.stderr
        taken = rt("run", "-d", "--name", "holder", "busybox", "true", check=False)
        assert taken.returncode == 125 and "holder" in taken.stderr
        unknown = rt("run", "--rm", "127.0.0.1:1/no/such:image", "true", check=False)
        assert unknown.returncode == 125 and len(unknown.stderr.strip().splitlines()) >= 1
        malformed = rt("run", "--rm", "-v", "relative/path:/x", "busybox", "true", check=False)
        assert malformed.returncode == 125 and "relative/path" in malformed.stderr
        (context / "Dockerfile").write_text("FROM busybox\nFROBNICATE now\n")
        bad_file = rt("build", "-t", "bad:v1", ".", cwd=context, check=False)
        assert bad_file.returncode == 125 and "FROBNICATE" in bad_file.stderr.upper()
        (context / "Dockerfile").write_text("FROM busybox\nRUN echo about to fail; exit 3\n")
        failing = rt("build", "-t", "bad:v1", ".", cwd=context, check=False)
        assert failing.returncode == 1 and "about to fail" in failing.stdout + failing.stderr
        assert "non-zero code: 3" in failing.stdout + failing.stderr
        assert "bad" not in rt("images").stdout
        rt("rm", "-f", in_use)
        rt("volume", "rm", "demo")
        assert rt("ps", "-aq").stdout == "" and rt("volume", "ls", "-q").stdout == ""
    finally:
        leftovers = reap_leftovers(daemon.state, [namespace])
    assert not leftovers, f"test left {leftovers}"
    assert not mounts_under(Path(daemon.root)) and not mounts_under(Path(daemon.state))
