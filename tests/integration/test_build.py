"""runtimectl build against a real daemon and real runc (root only)."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
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


def layer_names(rt: Builder, name: str, index: int) -> list[str]:
    manifest, _ = rt.documents(name)
    data = rt.read(manifest["layers"][index]["digest"])
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return tar.getnames()


def test_layers_hold_only_the_steps_changes(rt, tmp_path):
    assert rt.build(app_context(tmp_path), "-t", "app:v1").returncode == 0
    name = "docker.io/library/app:v1"
    manifest, config = rt.documents(name)
    assert all(
        layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip" for layer in manifest["layers"]
    )
    assert layer_names(rt, name, 1) == ["app"]  # WORKDIR
    assert layer_names(rt, name, 2) == ["app", "app/run.sh"]  # COPY
    assert layer_names(rt, name, 3) == ["app", "app/built.txt"]  # RUN: no proc/, dev/, sys/ mount points
    assert [h.get("empty_layer", False) for h in config["history"]][-4:] == [False, False, False, True]


def test_dockerignore_is_honoured(rt, tmp_path):
    context = write(
        tmp_path / "ctx",
        {
            "Dockerfile": 'FROM busybox:local\nCOPY . /ctx/\nCMD ["ls", "-aR", "/ctx"]\n',
            ".dockerignore": "# secrets\n*.key\nlogs\n!logs/keep.log\n**/*.tmp\n/Dockerfile\n",
            "a.txt": "a",
            "secret.key": "k",
            "logs/x.log": "x",
            "logs/keep.log": "keep",
            "deep/er/junk.tmp": "t",
            "deep/er/fine.txt": "f",
        },
    )
    result = rt.build(context, "-t", "ignored:v1")
    assert result.returncode == 0, result.stderr
    status, out = rt.run_image("docker.io/library/ignored:v1")
    assert status == 0
    listing = {line.rstrip(":") for line in out.split()}
    assert {"a.txt", "deep", "fine.txt", "keep.log", "logs"} <= listing
    assert not {"secret.key", "x.log", "junk.tmp", "Dockerfile"} & listing
    assert ".dockerignore" in listing  # not excluded by itself


def test_build_args_and_variable_substitution(rt, tmp_path):
    context = write(
        tmp_path / "args",
        {
            "Dockerfile": (
                "ARG BASE=busybox:local\n"
                "FROM ${BASE}\n"
                "ARG GREETING=hello\n"
                "ENV TARGET=world DIR=/out\n"
                "WORKDIR ${DIR:-/nowhere}\n"
                'RUN echo "$GREETING ${TARGET}" > msg && echo "args: $GREETING"\n'
                "ENV SHOWN=${GREETING}-${UNSET:-default}\n"
                'LABEL greeting="$GREETING" \\\n'
                "      other=fixed\n"
                "CMD cat msg; echo $SHOWN; pwd\n"
            )
        },
    )
    first = rt.build(
        context, "--build-arg", "GREETING=bonjour", "--build-arg", "NOT_DECLARED=1", "-t", "args:v1"
    )
    assert first.returncode == 0, first.stderr
    assert "args: bonjour" in first.stdout
    assert "[Warning] One or more build-args [NOT_DECLARED] were not consumed" in first.stdout
    status, out = rt.run_image("docker.io/library/args:v1")
    assert (status, out) == (0, "bonjour world\nbonjour-default\n/out\n")
    _, config = rt.documents("docker.io/library/args:v1")
    assert config["config"]["Labels"] == {"greeting": "bonjour", "other": "fixed"}
    assert config["config"]["Cmd"] == ["/bin/sh", "-c", "cat msg; echo $SHOWN; pwd"]
    assert "GREETING" not in " ".join(config["config"]["Env"])  # build args are not kept
    run_history = [h["created_by"] for h in config["history"] if h["created_by"].startswith("RUN")]
    assert run_history[-1].startswith("RUN |1 GREETING=bonjour /bin/sh -c ")

    same = rt.build(context, "--build-arg", "GREETING=bonjour", "-t", "args:v1")
    assert "args: bonjour" not in same.stdout  # cached
    other = rt.build(context, "--build-arg", "GREETING=hallo", "-t", "args:v2")
    assert other.returncode == 0 and "args: hallo" in other.stdout  # a new value invalidates the RUN
    assert rt.run_image("docker.io/library/args:v2", container_id="run2")[1].startswith("hallo world\n")


def test_chown_user_and_add_archive(rt, tmp_path):
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name, data, uid in (("pkg/a.txt", b"from the archive\n", 7), ("pkg/sub/b.txt", b"b\n", 8)):
            info = tarfile.TarInfo(name)
            info.size, info.uid, info.gid, info.mode = len(data), uid, uid, 0o640
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("pkg/link")
        link.type, link.linkname = tarfile.SYMTYPE, "a.txt"
        tar.addfile(link)
    context = write(
        tmp_path / "own",
        {
            "Dockerfile": (
                "FROM busybox:local\n"
                "RUN mkdir -p /etc && echo 'app:x:1234:4321::/home/app:/bin/sh' >> /etc/passwd "
                "&& echo 'staff:x:50:' >> /etc/group\n"
                "COPY --chown=1000:1000 f.txt /numeric.txt\n"
                "COPY --chown=app:staff f.txt d/ /named/\n"
                "COPY --chmod=0700 f.txt /private.txt\n"
                "ADD pkg.tar.gz /opt/\n"
                "ADD f.txt /opt/plain.txt\n"
                "USER app\n"
                'RUN echo "running as $(id -u):$(id -g)"\n'
                "CMD ls -ln /numeric.txt /named/f.txt /named/inner.txt /private.txt /opt/pkg/a.txt; "
                "cat /opt/pkg/link /opt/plain.txt\n"
            ),
            "f.txt": "plain\n",
            "d/inner.txt": "inner\n",
        },
    )
    (context / "pkg.tar.gz").write_bytes(archive.getvalue())
    result = rt.build(context, "-t", "own:v1")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "running as 1234:4321" in result.stdout
    # runtimed.tasks.spec takes numeric users only: run it as root (the RUN step above ran as app)
    status, out = rt.run_image("docker.io/library/own:v1", user="0")
    assert status == 0, out
    lines = out.splitlines()
    owners = {line.split()[-1]: (line.split()[0], line.split()[2], line.split()[3]) for line in lines[:5]}
    assert owners["/numeric.txt"] == ("-rw-r--r--", "1000", "1000")
    assert owners["/named/f.txt"][1:] == ("1234", "50")
    assert owners["/named/inner.txt"][1:] == ("1234", "50")
    assert owners["/private.txt"] == ("-rwx------", "0", "0")
    assert owners["/opt/pkg/a.txt"] == ("-rw-r-----", "7", "7")  # the archive's owner and mode
    assert lines[5:] == ["from the archive", "plain"]


def test_from_scratch_with_a_static_binary(rt, tmp_path):
    context = write(
        tmp_path / "scratch",
        {
            "Dockerfile": (
                "FROM scratch\nCOPY busybox /bin/busybox\n"
                'ENTRYPOINT ["/bin/busybox"]\nCMD ["echo", "static"]\n'
            )
        },
    )
    (context / "busybox").write_bytes(Path("/bin/busybox").read_bytes())
    (context / "busybox").chmod(0o755)
    result = rt.build(context, "-t", "static:v1")
    assert result.returncode == 0, (result.stdout, result.stderr)
    manifest, config = rt.documents("docker.io/library/static:v1")
    assert len(manifest["layers"]) == 1 and config["config"]["Entrypoint"] == ["/bin/busybox"]
    assert layer_names(rt, "docker.io/library/static:v1", 0) == ["bin", "bin/busybox"]
    assert rt.run_image("docker.io/library/static:v1") == (0, "static\n")


def test_multi_stage_copy_from(rt, tmp_path):
    context = write(
        tmp_path / "multi",
        {
            "Dockerfile": (
                "FROM busybox:local AS builder\n"
                'RUN ["sh", "-c", "echo compiled > /artifact"]\n'
                "FROM scratch\n"
                "COPY --from=builder /bin/busybox /out/\n"
                "COPY --from=0 /artifact /out/\n"
                'CMD ["/out/busybox", "cat", "/out/artifact"]\n'
            )
        },
    )
    result = rt.build(context, "-t", "multi:v1")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert rt.run_image("docker.io/library/multi:v1") == (0, "compiled\n")
    assert len(rt.documents("docker.io/library/multi:v1")[0]["layers"]) == 2
    target = rt.build(context, "--target", "builder", "-t", "first:v1")
    assert target.returncode == 0 and "Step 3/" not in target.stdout
    assert rt.run_image("docker.io/library/first:v1", ["cat", "/artifact"], container_id="run2") == (
        0,
        "compiled\n",
    )
    assert rt.build(context, "--target", "nosuch").returncode == 125


def test_unknown_instruction_builds_nothing(rt, tmp_path):
    context = write(tmp_path / "bad", {"Dockerfile": "FROM busybox:local\nRUN echo never\nFOO bar\n"})
    before = (rt.image_names(), rt.snapshots())
    result = rt.build(context, "-t", "bad:v1")
    assert result.returncode == 125
    assert "line 3" in result.stderr and "unknown instruction: FOO" in result.stderr
    assert "Step" not in result.stdout
    assert (rt.image_names(), rt.snapshots()) == before


def test_failing_run_shows_output_and_leaves_nothing(rt, tmp_path, daemon):
    context = write(
        tmp_path / "fail",
        {
            "Dockerfile": (
                "FROM busybox:local\n"
                "COPY f.txt /f.txt\n"
                "RUN echo before the failure; echo to stderr >&2; exit 3\n"
                'CMD ["true"]\n'
            ),
            "f.txt": "x",
        },
    )
    before = rt.snapshots()
    result = rt.build(context, "-t", "fail:v1")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "before the failure" in result.stdout and "to stderr" in result.stdout
    assert "returned a non-zero code: 3" in result.stderr
    assert "Successfully" not in result.stdout
    assert rt.image("docker.io/library/fail:v1") is None
    assert rt.containers() == []
    cached = rt.cache_chains()
    assert len(cached) == 1  # the COPY step is cached; the RUN left nothing
    assert {k: v for k, v in rt.snapshots().items() if k not in cached} == before
    assert not mounts_under(daemon.state / TASK_STATE)
    assert not [m for m in mounts_under(Path("/tmp")) if "runtimed-mount-" in m]


def test_missing_copy_source_fails_the_step(rt, tmp_path):
    context = write(tmp_path / "missing", {"Dockerfile": "FROM busybox:local\nCOPY nothere /x\n"})
    result = rt.build(context, "-t", "missing:v1")
    assert result.returncode == 1
    assert "file not found in build context" in result.stderr and "nothere" in result.stderr
    assert rt.image("docker.io/library/missing:v1") is None


def test_prune_drops_the_cache(rt, tmp_path):
    context = app_context(tmp_path)
    assert rt.build(context, "-t", "app:v1").returncode == 0
    assert rt.cache_chains()
    assert rt.ok("builder", "prune", "-f") == "Deleted 3 build cache records\n"
    assert rt.cache_chains() == set()
    again = rt.build(context, "-t", "app:v1")
    assert again.returncode == 0 and "side effect 42" in again.stdout
    assert rt.ok("build", "prune").startswith("Deleted 3 build cache records")


def test_built_image_pushes_and_pulls_back_in_another_namespace(rt, tmp_path, daemon, registry):
    assert rt.build(app_context(tmp_path), "-t", "app:v1").returncode == 0
    remote = registry.ref(f"build/app-{os.getpid()}", "v1")
    rt.ok("push", "app:v1", remote)
    other = Builder(daemon, tmp_path / "other")
    try:
        other.ok("pull", remote)  # the daemon verifies every blob, and every diff_id while unpacking
        assert other.run_image(remote) == (0, "hello from app\nbuilt by RUN\n/app\n")
        assert other.documents(remote) == rt.documents("docker.io/library/app:v1")
    finally:
        reap_leftovers(daemon.state, [other.namespace])
        other.close()


def test_interrupted_run_leaves_nothing(rt, tmp_path, daemon):
    context = write(tmp_path / "slow", {"Dockerfile": "FROM busybox:local\nRUN echo started; sleep 60\n"})
    before = rt.snapshots()
    process = rt.popen("build", "-t", "slow:v1", str(context))
    try:
        lines = []
        while "started\n" not in lines:
            line = process.stdout.readline()
            assert line, (lines, process.stderr.read())
            lines.append(line)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert rt.image("docker.io/library/slow:v1") is None
    assert rt.containers() == []
    assert rt.snapshots() == before and rt.cache_chains() == set()
    assert not mounts_under(daemon.state / TASK_STATE)


def test_from_pulls_a_missing_image(rt, tmp_path, daemon, registry):
    remote = registry.ref(f"build/busybox-{os.getpid()}", "v1")
    rt.ok("push", BUSYBOX, remote)
    other = Builder(daemon, tmp_path / "other")
    try:
        context = write(tmp_path / "pull", {"Dockerfile": f"FROM {remote}\nRUN echo ran on the $((6*7))\n"})
        result = other.build(context, "-t", "pulled:v1")
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert "ran on the 42" in result.stdout
        assert other.image_names() == sorted(["docker.io/library/pulled:v1", remote])
    finally:
        reap_leftovers(daemon.state, [other.namespace])
        other.close()


@pytest.mark.skipif(shutil.which("ctr") is None, reason="needs containerd's ctr")
def test_ctr_checks_and_runs_a_built_image(rt, tmp_path, daemon):
    assert rt.build(app_context(tmp_path), "-t", "app:v1").returncode == 0
    ctr = ["ctr", "-a", daemon.address, "-n", rt.namespace]
    check = subprocess.run([*ctr, "images", "check"], capture_output=True, text=True, timeout=60)
    row = next(line for line in check.stdout.splitlines() if line.startswith("docker.io/library/app:v1"))
    assert "complete (5/5)" in row and row.split()[-1] == "true"  # config and 4 layers present, unpacked
    run = subprocess.run(
        [*ctr, "run", "--rm", "docker.io/library/app:v1", "ctr-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (run.returncode, run.stdout) == (0, "hello from app\nbuilt by RUN\n/app\n")


def test_copy_and_add_never_leave_the_image(rt, tmp_path):
    marker = f"runtimed-build-escape-{os.getpid()}"
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        info = tarfile.TarInfo(f"inside/{marker}")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"ok"))
    context = write(
        tmp_path / "escape",
        {
            "Dockerfile": (
                "FROM busybox:local\n"
                "RUN mkdir -p /etc /deep/a && ln -s /tmp /evil && ln -s ../../../../../../tmp /deep/a/up\n"
                f"COPY f.txt /evil/{marker}\n"
                f"COPY f.txt /deep/a/up/{marker}.2\n"
                "ADD plain.tar /evil/\n"
                f'CMD ["cat", "/tmp/{marker}", "/tmp/{marker}.2", "/tmp/inside/{marker}"]\n'
            ),
            "f.txt": "in the image\n",
        },
    )
    (context / "plain.tar").write_bytes(archive.getvalue())
    result = rt.build(context, "-t", "escape:v1")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert not Path(f"/tmp/{marker}").exists() and not Path(f"/tmp/{marker}.2").exists()
    assert not Path(f"/tmp/inside/{marker}").exists()
    assert rt.run_image("docker.io/library/escape:v1") == (0, "in the image\nin the image\nok")


def test_add_refuses_an_archive_entry_outside_the_destination(rt, tmp_path):
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        info = tarfile.TarInfo("../../escape.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    context = write(tmp_path / "dotdot", {"Dockerfile": "FROM busybox:local\nADD bad.tar /opt/\n"})
    (context / "bad.tar").write_bytes(archive.getvalue())
    before = rt.snapshots()
    result = rt.build(context, "-t", "dotdot:v1")
    assert result.returncode == 1 and "points outside the destination" in result.stderr
    assert rt.snapshots() == before and rt.image("docker.io/library/dotdot:v1") is None


def test_config_instructions(rt, tmp_path):
    context = write(
        tmp_path / "config",
        {
            "Dockerfile": (
                "FROM busybox:local\n"
                "MAINTAINER someone\n"
                'SHELL ["/bin/sh", "-ec"]\n'
                'ENTRYPOINT ["/bin/sh", "-c"]\n'
                "USER 1000:1000\n"
                "EXPOSE 80 53/udp 8000-8001\n"
                'VOLUME ["/data", "/logs"]\n'
                "VOLUME /cache /tmp\n"
                "STOPSIGNAL SIGQUIT\n"
                "HEALTHCHECK --interval=30s --retries=3 CMD wget -q localhost || exit 1\n"
                "ONBUILD RUN echo later\n"
                "CMD echo shell form\n"
            )
        },
    )
    result = rt.build(context, "-t", "config:v1")
    assert result.returncode == 0, (result.stdout, result.stderr)
    manifest, config = rt.documents("docker.io/library/config:v1")
    assert len(manifest["layers"]) == 1  # the base's only: every step here is config
    image = config["config"]
    assert config["author"] == "someone"
    assert image["Entrypoint"] == ["/bin/sh", "-c"] and image["Cmd"] == ["/bin/sh", "-ec", "echo shell form"]
    assert image["User"] == "1000:1000" and image["StopSignal"] == "SIGQUIT"
    assert image["ExposedPorts"] == {"80/tcp": {}, "53/udp": {}, "8000/tcp": {}, "8001/tcp": {}}
    assert image["Volumes"] == {"/data": {}, "/logs": {}, "/cache": {}, "/tmp": {}}
    assert image["Healthcheck"] == {
        "Test": ["CMD-SHELL", "wget -q localhost || exit 1"],
        "Interval": 30 * 10**9,
        "Retries": 3,
    }
    assert image["OnBuild"] == ["RUN echo later"] and image["Shell"] == ["/bin/sh", "-ec"]
    assert all(h.get("empty_layer") for h in config["history"][1:])


def test_garbage_collection_keeps_cache_until_pruned(rt, tmp_path):
    snapshots, content = rt.snapshots(), rt.content_digests()
    assert rt.build(app_context(tmp_path), "-t", "app:v1").returncode == 0
    rt.ok("rmi", "--sync", "app:v1")
    cached = rt.cache_chains()
    assert len(cached) == 3 and cached <= set(rt.snapshots())  # the records hold their snapshots
    again = rt.build(app_context(tmp_path), "-t", "app:v1")
    assert again.stdout.count("Using cache") == 3  # ... and their layers: the image is whole again
    assert rt.run_image("docker.io/library/app:v1") == (0, "hello from app\nbuilt by RUN\n/app\n")
    rt.ok("rmi", "--sync", "app:v1")
    rt.ok("builder", "prune")
    assert rt.snapshots() == snapshots and rt.content_digests() == content
