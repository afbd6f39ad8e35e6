"""runtimectl's docker-style container commands against a real daemon with real runc (root only):
run, ps, exec, logs, stop, kill, rm, start, restart, pause, inspect, top, stats, -v, limits, exit codes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fixtures.archives import oci_archive
from fixtures.cli import Runner, runner
from fixtures.cli_images import cli_busybox, configured_image
from fixtures.tasks import TASK_STATE, mounts_under, reap_leftovers, shell_on_a_terminal, unique_namespace

from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from runtimed.wire import NAMESPACE_KEY

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, mounts)"),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
BUSYBOX = "docker.io/library/busybox:latest"  # `busybox` resolves to it
CONFIGURED = "docker.io/library/configured:v1"
RFC3339_NANO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z ")


@pytest.fixture
def rtctl(daemon, tmp_path) -> Iterator[Runner]:
    namespace = unique_namespace("dk")
    run = runner(daemon, namespace)
    archive = tmp_path / "images.tar"
    archive.write_bytes(oci_archive([(BUSYBOX, cli_busybox()), (CONFIGURED, configured_image())]))
    run("import", str(archive))
    yield run
    leftovers = reap_leftovers(daemon.state, [namespace])
    assert not leftovers, f"test left {leftovers}"


def log_file(daemon, namespace: str, name: str) -> Path:
    return Path(daemon.root) / "io.containerd.runtime.v2.task" / "logs" / namespace / f"{name}.log"


def snapshot_keys(daemon, namespace: str) -> set[str]:
    with daemon.client(namespace) as client:
        stub = snapshots_pb2_grpc.SnapshotsStub(client.channel)
        listed = stub.List(
            snapshots_pb2.ListSnapshotsRequest(snapshotter="overlayfs"), metadata=[(NAMESPACE_KEY, namespace)]
        )
        return {info.name for response in listed for info in response.info}


def wait_for(predicate: Callable[[], bool], timeout: float = 15, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def ps_rows(rtctl: Runner, *flags: str) -> dict[str, dict]:
    return {row["Name"]: row for row in json.loads(rtctl("ps", *flags, "--format", "json").stdout)}


# -- the demo: run -d, exec, logs, stop, rm ----------------------------------------------------


def test_detached_top_exec_logs_stop_rm(rtctl, daemon):
    ns = rtctl.namespace
    assert rtctl("run", "-d", "--name", "demo", "busybox", "top").stdout == "demo\n"
    rows = ps_rows(rtctl)
    assert rows["demo"]["State"] == "running" and rows["demo"]["Status"].startswith("Up ")
    assert rows["demo"]["Image"] == "busybox" and rows["demo"]["Command"] == '"top"'
    table = rtctl("ps").stdout.splitlines()
    assert re.split(r"\s{2,}", table[0]) == ["NAME", "IMAGE", "COMMAND", "CREATED", "STATUS"]
    assert table[1].startswith("demo ")

    processes = rtctl("exec", "demo", "ps").stdout.splitlines()
    first = processes[1].split()
    assert first[0] == "1" and first[-1] == "top", processes
    assert rtctl("exec", "demo", "sh", "-c", "exit 5", check=False).returncode == 5
    assert rtctl("exec", "-e", "X=1", "-w", "/tmp", "demo", "sh", "-c", "echo $X $(pwd)").stdout == "1 /tmp\n"
    assert rtctl("exec", "-u", "nobody", "demo", "id", "-u").stdout == "65534\n"

    started = time.monotonic()
    assert rtctl("stop", "demo").stdout == "demo\n"
    assert time.monotonic() - started < 8  # top honours SIGTERM: no 10 s wait for SIGKILL
    rows = ps_rows(rtctl, "-a")
    assert rows["demo"]["State"] == "exited"
    assert rows["demo"]["Status"].startswith(f"Exited ({128 + signal.SIGTERM}) ")
    assert "demo" not in ps_rows(rtctl)  # not running: only with -a
    assert log_file(daemon, ns, "demo").exists()

    assert rtctl("rm", "demo").stdout == "demo\n"
    assert rtctl("ps", "-aq").stdout == ""
    assert "demo" not in snapshot_keys(daemon, ns)
    assert not log_file(daemon, ns, "demo").exists()
    assert not mounts_under(daemon.state / TASK_STATE)


def test_logs_streams_tail_timestamps_and_follow(rtctl, daemon):
    script = (
        'echo one; sleep 0.2; echo two >&2; sleep 0.2; echo three; trap "echo bye; exit 0" TERM; '
        "while true; do sleep 0.1; done"
    )
    rtctl("run", "-d", "--name", "talker", "busybox", "sh", "-c", script)
    wait_for(lambda: "three" in rtctl("logs", "talker").stdout, what="the log")
    logs = rtctl("logs", "talker")
    assert (logs.stdout, logs.stderr) == ("one\nthree\n", "two\n")
    assert rtctl("logs", "--tail", "1", "talker").stdout == "three\n"
    assert rtctl("logs", "-n", "0", "talker").stdout == ""
    assert rtctl("logs", "--since", "1h", "talker").stdout == "one\nthree\n"
    assert rtctl("logs", "--since", "2999-01-01T00:00:00Z", "talker").stdout == ""
    assert rtctl("logs", "--until", "2000-01-01", "talker").stdout == ""
    stamped = rtctl("logs", "--timestamps", "talker").stdout.splitlines()
    assert [RFC3339_NANO.sub("", line) for line in stamped] == ["one", "three"]
    assert all(RFC3339_NANO.match(line) for line in stamped)
    records = [
        json.loads(line) for line in log_file(daemon, rtctl.namespace, "talker").read_text().splitlines()
    ]
    assert [(r["stream"], r["log"]) for r in records] == [
        ("stdout", "one\n"),
        ("stderr", "two\n"),
        ("stdout", "three\n"),
    ]

    # The image's stop signal (SIGTERM here) is trapped: exit 0, and its last words are logged.
    rtctl("stop", "-t", "5", "talker")
    assert rtctl("logs", "talker").stdout.endswith("three\nbye\n")
    assert ps_rows(rtctl, "-a")["talker"]["Status"].startswith("Exited (0) ")

    # -f follows until the task exits.
    rtctl(
        "run", "-d", "--name", "counter", "busybox", "sh", "-c", "for i in 1 2 3; do echo $i; sleep 0.4; done"
    )
    started = time.monotonic()
    followed = rtctl("logs", "-f", "counter")
    assert followed.stdout == "1\n2\n3\n"
    assert time.monotonic() - started < 15
    rtctl("rm", "talker", "counter")


def test_logs_survive_a_daemon_restart(daemon_factory, tmp_path):
    daemon = daemon_factory().start()
    namespace = unique_namespace("dr")
    rtctl = runner(daemon, namespace)
    archive = tmp_path / "images.tar"
    archive.write_bytes(oci_archive([(BUSYBOX, cli_busybox())]))
    try:
        rtctl("import", str(archive))
        rtctl(
            "run",
            "-d",
            "--name",
            "keeper",
            "busybox",
            "sh",
            "-c",
            "echo before; sleep 2; echo after; sleep 300",
        )
        wait_for(lambda: rtctl("logs", "keeper").stdout == "before\n", what="the first line")
        daemon.restart()
        wait_for(
            lambda: rtctl("logs", "keeper").stdout == "before\nafter\n", what="the line after the restart"
        )
        assert ps_rows(rtctl)["keeper"]["State"] == "running"
        daemon.kill()  # kill -9: the shim and the log go on
        daemon.start()
        assert rtctl("logs", "--tail", "1", "keeper").stdout == "after\n"
        rtctl("rm", "-f", "keeper")
        assert not log_file(daemon, namespace, "keeper").exists()
    finally:
        leftovers = reap_leftovers(daemon.state, [namespace])
    assert not leftovers, f"test left {leftovers}"


# -- run: mounts, config merging, limits --------------------------------------------------------


def test_bind_mounts(rtctl, tmp_path):
    host = tmp_path / "x"  # missing: created, as docker does
    rtctl("run", "--rm", "-v", f"{host}:/tmp", "busybox", "sh", "-c", "date > /tmp/demo.log")
    assert (host / "demo.log").read_text().strip()
    readonly = rtctl(
        "run", "--rm", "-v", f"{host}:/data:ro", "busybox", "sh", "-c", "echo x > /data/f", check=False
    )
    assert readonly.returncode != 0 and "Read-only file system" in readonly.stderr
    assert not (host / "f").exists()
    assert rtctl("run", "--rm", "-v", f"{host}:/data:rw", "busybox", "cat", "/data/demo.log").stdout.strip()
    rtctl("run", "-d", "--name", "mounted", "-v", f"{host}:/data:ro", "busybox", "sleep", "300")
    [info] = json.loads(rtctl("inspect", "mounted").stdout)
    assert info["Mounts"] == [
        {"Type": "bind", "Source": str(host), "Destination": "/data", "Mode": "ro", "RW": False}
    ]
    rtctl("rm", "-f", "mounted")
    assert host.exists()  # a bind source is the host's: never removed


def test_image_config_merging(rtctl, tmp_path):
    def out(*args: str, **kwargs) -> str:
        return rtctl("run", "--rm", *args, **kwargs).stdout

    # Entrypoint + Cmd; CMD arguments replace Cmd; --entrypoint resets Cmd.
    assert out(CONFIGURED) == "entry default args\n"
    assert out(CONFIGURED, "mine") == "entry mine\n"
    assert out("--entrypoint", "pwd", CONFIGURED) == "/home/alice\n"
    assert out("--entrypoint", "sh", CONFIGURED, "-c", "id -un; id -u; id -g") == "alice\n1000\n1000\n"
    # User: -u overrides, names resolved through the image's /etc/passwd and /etc/group.
    assert out("-u", "nobody", "--entrypoint", "id", CONFIGURED) == "uid=65534(nobody) gid=65534(nogroup)\n"
    assert out("-u", "alice:staff", "busybox", "id") == "uid=1000(alice) gid=50(staff)\n"
    assert out("-u", "0", "busybox", "id", "-u") == "0\n"
    assert out("-u", "4242:4343", "busybox", "sh", "-c", "id -u; id -g") == "4242\n4343\n"
    nobody = rtctl("run", "--rm", "-u", "mallory", "busybox", "true", check=False)
    assert nobody.returncode == 125 and "mallory" in nobody.stderr
    # Working directory: the image's, or -w.
    assert out("-w", "/tmp", "--entrypoint", "pwd", CONFIGURED) == "/tmp\n"
    # Env: the image's, then --env-file, then -e (NAME alone: this process's value).
    env_file = tmp_path / "env"
    env_file.write_text("# a comment\nSHARED=file\nFROM_FILE=1\n\nFROM_HOST_FILE\n")
    printed = out(
        "--env-file",
        str(env_file),
        "-e",
        "SHARED=cli",
        "-e",
        "FROM_HOST",
        "-e",
        "UNSET_HERE",
        "--entrypoint",
        "env",
        CONFIGURED,
        env_extra={"FROM_HOST": "host value", "FROM_HOST_FILE": "hf"},
    ).splitlines()
    assert "SHARED=cli" in printed and "ONLY_IMAGE=yes" in printed and "FROM_FILE=1" in printed
    assert "FROM_HOST=host value" in printed and "FROM_HOST_FILE=hf" in printed
    assert not any(line.startswith("UNSET_HERE") for line in printed)
    assert sum(line.startswith("SHARED=") for line in printed) == 1
    # Hostname: the name's first 12 characters, or --hostname.
    assert out("--name", "a-rather-long-name", "busybox", "hostname") == "a-rather-lon\n"
    assert out("--hostname", "web.local", "busybox", "hostname") == "web.local\n"
    # A generated name: adjective_surname.
    rtctl("run", "-d", "busybox", "sleep", "300")
    [name] = rtctl("ps", "-q").stdout.split()
    assert re.fullmatch(r"[a-z]+_[a-z]+", name), name
    rtctl("rm", "-f", name)


def test_resource_limits_in_the_spec_and_the_cgroup(rtctl):
    ns = rtctl.namespace
    rtctl(
        "run",
        "-d",
        "--name",
        "lim",
        "--memory",
        "64m",
        "--cpus",
        "0.5",
        "--pids-limit",
        "20",
        "busybox",
        "sleep",
        "300",
    )
    spec = json.loads(rtctl("containers", "info", "lim").stdout)["spec"]
    resources = spec["linux"]["resources"]
    assert resources["memory"]["limit"] == 64 * 1024 * 1024
    assert resources["cpu"] == {"quota": 50000, "period": 100000}
    assert resources["pids"] == {"limit": 20}
    [info] = json.loads(rtctl("inspect", "lim").stdout)
    assert info["HostConfig"] == {
        "Runtime": "io.containerd.runc.v2",
        "Memory": 64 * 1024 * 1024,
        "NanoCpus": 500_000_000,
        "PidsLimit": 20,
    }
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():  # v2
        group = root / ns / "lim"
        assert (group / "memory.max").read_text().strip() == str(64 * 1024 * 1024)
        assert (group / "cpu.max").read_text().split() == ["50000", "100000"]
        assert (group / "pids.max").read_text().strip() == "20"
    else:
        assert (root / "memory" / ns / "lim" / "memory.limit_in_bytes").read_text().strip() == str(64 << 20)
        assert (root / "cpu" / ns / "lim" / "cpu.cfs_quota_us").read_text().strip() == "50000"
        assert (root / "pids" / ns / "lim" / "pids.max").read_text().strip() == "20"
    stats = json.loads(rtctl("stats", "--no-stream", "--format", "json", "lim").stdout)
    assert stats[0]["Name"] == "lim" and stats[0]["MemUsage"].endswith(" / 64MiB")
    assert rtctl("run", "--rm", "--memory", "1k", "busybox", "true", check=False).returncode == 125
    rtctl("rm", "-f", "lim")


# -- errors and exit codes ---------------------------------------------------------------------


def test_exit_codes_and_failures_leave_nothing(rtctl, daemon, tmp_path):
    ns = rtctl.namespace
    before = snapshot_keys(daemon, ns)
    # 127: not found; 126: not executable / a directory. --rm: nothing left.
    for args, status in (
        (("nope",), 127),
        (("/bin/not-executable",), 126),
        (("/etc",), 126),
    ):
        result = rtctl("run", "--rm", "busybox", *args, check=False)
        assert result.returncode == status, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("runtimectl: "), result.stderr
    assert rtctl("ps", "-aq").stdout == "" and snapshot_keys(daemon, ns) == before
    # Without --rm the container stays, exited with that code (as docker's does).
    assert rtctl("run", "--name", "kept", "busybox", "nope", check=False).returncode == 127
    assert ps_rows(rtctl, "-a")["kept"]["Status"].startswith("Exited (127)")
    rtctl("rm", "kept")
    # exec too.
    rtctl("run", "-d", "--name", "target", "busybox", "sleep", "300")
    assert rtctl("exec", "target", "nope", check=False).returncode == 127
    assert rtctl("exec", "target", "/bin/not-executable", check=False).returncode == 126

    # 125: the name is in use; nothing else was made.
    clash = rtctl("run", "--name", "target", "busybox", "true", check=False)
    assert clash.returncode == 125 and "already in use" in clash.stderr
    assert rtctl("ps", "-aq").stdout == "target\n"
    # 125: an unknown image (the registry has no such repository).
    missing = rtctl("run", "--rm", "127.0.0.1:1/nope:1", "true", check=False)
    assert missing.returncode == 125 and "127.0.0.1:1" in missing.stderr.splitlines()[-1]
    # 125: an unavailable runtime; nothing is left behind, even without --rm.
    for runtime in ("kata", "io.example.nope.v1"):
        result = rtctl("run", "--name", "rt", "--runtime", runtime, "busybox", "true", check=False)
        assert result.returncode == 125 and f'"{runtime}"' in result.stderr
    # 125, one line, nothing created: malformed options.
    host = tmp_path / "never"
    for bad in (
        ("-v", "relative/path:/x"),
        ("-v", f"{host}"),
        ("-v", f"{host}:"),
        ("-v", f"{host}:/x:rx"),
        ("-v", f"{host}:relative"),
        ("--name", "_bad"),
        ("--name", "a b"),
        ("--memory", "lots"),
        ("--cpus", "many"),
    ):
        result = rtctl("run", *bad, "busybox", "true", check=False)
        assert result.returncode == 125, (bad, result.stderr)
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("runtimectl: "), result.stderr
    assert not host.exists()
    assert rtctl("ps", "-aq").stdout == "target\n"
    assert snapshot_keys(daemon, ns) == before | {"target"}
    # rm refuses a running container without -f; unknown names fail one by one.
    refused = rtctl("rm", "target", check=False)
    assert refused.returncode == 125 and "rm -f" in refused.stderr
    mixed = rtctl("rm", "-f", "ghost", "target", check=False)
    assert mixed.returncode == 125 and mixed.stdout == "target\n" and "ghost" in mixed.stderr
    assert rtctl("ps", "-aq").stdout == ""


def test_run_rm_leaves_nothing(rtctl, daemon):
    ns = rtctl.namespace
    before = snapshot_keys(daemon, ns)
    assert rtctl("run", "--rm", "--name", "gone", "busybox", "echo", "hi").stdout == "hi\n"
    assert rtctl("run", "--rm", "busybox", "sh", "-c", "exit 3", check=False).returncode == 3
    assert rtctl("containers", "ls", "-q").stdout == ""
    assert snapshot_keys(daemon, ns) == before
    assert not log_file(daemon, ns, "gone").exists()
    assert not mounts_under(daemon.state / TASK_STATE)
    assert rtctl("tasks", "ls", "-q").stdout == ""


# -- ps, inspect, top, stats, pause, restart, start, kill --------------------------------------


def test_ps_inspect_top_stats_pause_restart_start_kill(rtctl):
    rtctl(
        "run",
        "-d",
        "--name",
        "web",
        "--label",
        "app=web",
        "busybox",
        "sh",
        "-c",
        "trap 'exit 0' TERM; while true; do sleep 0.1; done",
    )
    assert rtctl("create", "--name", "later", "busybox", "echo", "made later").stdout == "later\n"
    rows = ps_rows(rtctl, "-a")
    assert rows["later"]["Status"] == "Created" and rows["web"]["State"] == "running"
    assert rtctl("ps", "-a", "--format", "{{.Name}}:{{.State}}").stdout.split() == [
        "later:created",
        "web:running",
    ]
    assert rtctl("ps", "-q", "-f", "label=app=web").stdout == "web\n"
    assert rtctl("ps", "-q", "-f", "status=created").stdout == "later\n"
    assert rtctl("ps", "-aq", "-f", "name=ate", "-f", "ancestor=busybox").stdout == "later\n"
    assert rtctl("ps", "-f", "bogus=1", check=False).returncode == 125
    table = rtctl("ps", "-a", "--format", "table {{.Name}}\\t{{.Status}}").stdout.splitlines()
    assert re.split(r"\s{2,}", table[0]) == ["NAME", "STATUS"]

    [info] = json.loads(rtctl("inspect", "web").stdout)
    assert info["Name"] == "web" and info["Image"] == BUSYBOX
    assert info["State"]["Status"] == "running" and info["State"]["Running"] and info["State"]["Pid"] > 0
    assert info["Config"]["Labels"]["app"] == "web" and info["Config"]["Hostname"] == "web"
    assert info["Config"]["Cmd"][0] == "sh" and "FROM_IMAGE=1" in info["Config"]["Env"]
    assert info["LogPath"].endswith(f"/{rtctl.namespace}/web.log")
    assert rtctl("inspect", "-f", "{{.State.Status}} {{.Config.Hostname}}", "web").stdout == "running web\n"
    both = json.loads(rtctl("inspect", "web", "later").stdout)
    assert [item["Name"] for item in both] == ["web", "later"]
    image = json.loads(rtctl("inspect", "busybox").stdout)  # not a container: the image
    assert image["image"]["name"] == BUSYBOX

    top = rtctl("top", "web").stdout.splitlines()
    assert top[0].split() == ["UID", "PID", "PPID", "C", "STIME", "TTY", "TIME", "CMD"]
    assert any("sh -c trap" in line for line in top[1:])
    assert top[1].split()[1] == str(info["State"]["Pid"])
    stats = rtctl("stats", "--no-stream").stdout.splitlines()
    assert re.split(r"\s{2,}", stats[0]) == ["NAME", "CPU %", "MEM USAGE / LIMIT", "MEM %", "PIDS"]
    assert stats[1].startswith("web ")

    rtctl("pause", "web")
    assert ps_rows(rtctl)["web"]["Status"].endswith("(Paused)")
    assert rtctl("exec", "web", "true", check=False).returncode == 125
    rtctl("unpause", "web")
    pid_before = info["State"]["Pid"]
    assert rtctl("restart", "-t", "5", "web").stdout == "web\n"
    [again] = json.loads(rtctl("inspect", "web").stdout)
    assert again["State"]["Running"] and again["State"]["Pid"] != pid_before

    assert rtctl("start", "later").stdout == "later\n"
    wait_for(lambda: rtctl("logs", "later").stdout == "made later\n", what="later's output")
    wait_for(lambda: ps_rows(rtctl, "-a")["later"]["State"] == "exited", what="later to exit")
    attached = rtctl("start", "-a", "later")
    assert attached.stdout == "made later\n"

    rtctl("kill", "-s", "TERM", "web")
    wait_for(lambda: ps_rows(rtctl, "-a")["web"]["Status"].startswith("Exited (0)"), what="web to exit")
    not_running = rtctl("kill", "web", check=False)
    assert not_running.returncode == 125 and "not running" in not_running.stderr
    assert rtctl("wait", "web").stdout == "0\n"
    rtctl("rm", "web", "later")


def test_help_and_completion():
    def ok(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "runtimed.cli.main", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO_ROOT,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    for command in (
        "run",
        "create",
        "ps",
        "exec",
        "logs",
        "stop",
        "kill",
        "rm",
        "start",
        "restart",
        "pause",
        "unpause",
        "inspect",
        "top",
        "stats",
        "wait",
        "completion",
        "rmi",
        "images",
    ):
        assert "usage: runtimectl" in ok(command, "--help")
    script = ok("completion", "bash")
    completed = subprocess.run(
        [
            "bash",
            "-c",
            f'{script}\nCOMP_WORDS=(runtimectl lo); COMP_CWORD=1; _runtimectl; echo "${{COMPREPLY[@]}}"\n'
            'COMP_WORDS=(runtimectl run --me); COMP_CWORD=2; _runtimectl; echo "${COMPREPLY[@]}"',
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    lines = completed.stdout.splitlines()
    assert "logs" in lines[0].split() and "load" in lines[0].split()
    assert lines[1].split() == ["--memory"]
    assert "compdef runtimectl" in ok("completion", "zsh")


async def test_run_pulls_a_missing_image(daemon, registry):
    from fixtures.images import push_image

    from runtimed.remotes import RegistryClient

    namespace = unique_namespace("dp")
    rtctl = runner(daemon, namespace)
    ref = registry.ref(f"team/bb{os.getpid()}", "v1")
    async with RegistryClient() as client:
        await push_image(client, ref, cli_busybox())
    try:
        # Short names resolve like docker's: the tag defaults to latest.
        short = str(ref).removesuffix(":v1")
        missing = rtctl("run", "--rm", short, "true", check=False)
        assert missing.returncode == 125 and "not found" in missing.stderr.splitlines()[-1]
        result = rtctl("run", "--rm", "--name", "pulled", str(ref), "echo", "pulled and ran")
        assert result.stdout == "pulled and ran\n"
        assert f"Unable to find image '{ref}' locally" in result.stderr
        assert f"Downloaded newer image for {ref}" in result.stderr
        assert [i.name for i in daemon.client(namespace).images()] == [str(ref)]
        again = rtctl("run", "--rm", str(ref), "true")  # present now: no pull
        assert again.stderr == ""
    finally:
        leftovers = reap_leftovers(daemon.state, [namespace])
    assert not leftovers, f"test left {leftovers}"


def test_attached_runs_forward_signals_and_are_logged(rtctl, daemon):
    # An attached run (no --rm) is logged as a detached one is.
    result = rtctl(
        "run",
        "--name",
        "attached",
        "busybox",
        "sh",
        "-c",
        "echo to-out; echo to-err >&2; exit 4",
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (4, "to-out\n", "to-err\n")
    logs = rtctl("logs", "attached")
    assert (logs.stdout, logs.stderr) == ("to-out\n", "to-err\n")
    assert ps_rows(rtctl, "-a")["attached"]["Status"].startswith("Exited (4)")
    rtctl("rm", "attached")

    # Signals to runtimectl reach the process; its exit status is runtimectl's.
    argv = [
        sys.executable,
        "-m",
        "runtimed.cli.main",
        "-a",
        daemon.address,
        "-n",
        rtctl.namespace,
        "run",
        "--rm",
        "--name",
        "sig",
        "busybox",
        "sh",
        "-c",
        "trap 'echo got TERM; exit 7' TERM; echo ready; while true; do sleep 0.1; done",
    ]
    client = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        assert client.stdout.readline() == "ready\n"
        client.send_signal(signal.SIGTERM)
        out, _ = client.communicate(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert (client.returncode, out) == (7, "got TERM\n")
    assert rtctl("ps", "-aq").stdout == ""

    # A detached process with a terminal logs raw text.
    rtctl("run", "-d", "-t", "--name", "tty", "busybox", "sh", "-c", "tty; sleep 300")
    wait_for(lambda: "/dev/pts/0" in rtctl("logs", "tty").stdout, what="the terminal's output")
    rtctl("rm", "-f", "tty")


def test_stop_uses_the_image_stop_signal_then_sigkill(rtctl):
    # configured's image config says StopSignal SIGUSR1.
    script = "trap 'echo usr1; exit 3' USR1; while true; do sleep 0.1; done"
    rtctl("run", "-d", "--name", "usr", "--entrypoint", "sh", CONFIGURED, "-c", script)
    time.sleep(0.3)
    rtctl("stop", "usr")
    assert ps_rows(rtctl, "-a")["usr"]["Status"].startswith("Exited (3)")
    wait_for(lambda: rtctl("logs", "usr").stdout == "usr1\n", what="the trap's output")

    # A process that ignores its stop signal is killed after -t seconds.
    rtctl(
        "run",
        "-d",
        "--name",
        "stubborn",
        "busybox",
        "sh",
        "-c",
        "trap '' TERM; while true; do sleep 0.1; done",
    )
    time.sleep(0.3)
    started = time.monotonic()
    rtctl("stop", "-t", "1", "stubborn")
    assert 0.9 < time.monotonic() - started < 10
    assert ps_rows(rtctl, "-a")["stubborn"]["Status"].startswith(f"Exited ({128 + signal.SIGKILL})")

    # exec -d leaves its process running; -i feeds stdin.
    rtctl("start", "stubborn")
    rtctl("exec", "-d", "stubborn", "sh", "-c", "echo detached > /tmp/mark")
    wait_for(
        lambda: rtctl("exec", "stubborn", "cat", "/tmp/mark", check=False).stdout == "detached\n",
        what="the detached exec",
    )
    assert rtctl("exec", "-i", "stubborn", "cat", input="piped\n").stdout == "piped\n"
    rtctl("rm", "-f", "usr", "stubborn")


def watchers(namespace: str) -> list[int]:
    """Pids of `run -d --rm` watchers of a namespace (to check that they are gone, never to kill)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"_autoremove" in argv and namespace.encode() in argv:
                found.append(int(entry.name))
    return found


def test_detached_rm_removes_the_container_when_it_ends(rtctl, daemon):
    ns = rtctl.namespace
    before = snapshot_keys(daemon, ns)
    assert (
        rtctl("run", "-d", "--rm", "--name", "brief", "busybox", "sh", "-c", "echo hi; sleep 1").stdout
        == "brief\n"
    )
    rtctl("run", "-d", "--rm", "--name", "long", "busybox", "sleep", "300")
    assert "long" in rtctl("ps", "-q").stdout.split()
    wait_for(lambda: rtctl("ps", "-aq").stdout == "long\n", what="brief to be removed")
    assert not log_file(daemon, ns, "brief").exists()
    assert rtctl("stop", "-t", "1", "long").stdout == "long\n"  # docker: a stopped --rm container goes
    wait_for(lambda: rtctl("ps", "-aq").stdout == "", what="long to be removed")
    assert snapshot_keys(daemon, ns) == before
    wait_for(lambda: not watchers(ns), what="the watchers to exit")


def test_exec_and_run_with_a_terminal(rtctl, daemon):
    rtctl("run", "-d", "--name", "shell", "busybox", "sleep", "300")
    base = [sys.executable, "-m", "runtimed.cli.main", "-a", daemon.address, "-n", rtctl.namespace]
    output, status = shell_on_a_terminal([*base, "exec", "-it", "shell", "sh"], cwd=str(REPO_ROOT))
    assert b"/dev/pts/" in output and b"sum=42" in output, output
    assert status == 7
    output, status = shell_on_a_terminal([*base, "run", "-it", "--rm", "busybox"], cwd=str(REPO_ROOT))
    assert b"/dev/pts/0" in output and b"sum=42" in output and status == 7, output
    rtctl("rm", "-f", "shell")
    assert rtctl("ps", "-aq").stdout == ""
