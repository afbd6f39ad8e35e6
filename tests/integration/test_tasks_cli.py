"""runtimectl run and runtimectl tasks against a real daemon (root only; real runc)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fixtures.archives import oci_archive
from fixtures.images import busybox_image
from fixtures.tasks import TASK_STATE, mounts_under, reap_leftovers, shell_on_a_terminal, unique_namespace

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, mounts)"),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE = "docker.io/library/busybox:cli"

Runner = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def rtctl(daemon, tmp_path) -> Iterator[Runner]:
    namespace = unique_namespace("x")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNTIMED_")}

    def run(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "runtimed.cli.main", "-a", daemon.address, "-n", namespace, *args],
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO_ROOT,
            env=env,
        )
        if check:
            assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
        return result

    archive = tmp_path / "busybox.tar"
    archive.write_bytes(oci_archive([(IMAGE, busybox_image())]))
    run("import", str(archive))
    run.namespace = namespace  # type: ignore[attr-defined]
    yield run
    leftovers = reap_leftovers(daemon.state, [namespace])
    assert not leftovers, f"test left {leftovers}"


def test_run_attached_exit_status_and_stdin(rtctl, daemon):
    result = rtctl("run", "--rm", "--name", "c1", IMAGE, "echo", "hello")
    assert result.stdout == "hello\n"
    assert (
        rtctl(
            "run", "--rm", "--name", "c2", IMAGE, "sh", "-c", "echo oops >&2; exit 3", check=False
        ).returncode
        == 3
    )
    result = rtctl(
        "run", "--rm", "-i", "--name", "c3", IMAGE, "sh", "-c", "cat; echo end", input="from-stdin\n"
    )
    assert result.stdout == "from-stdin\nend\n"
    env = rtctl(
        "run",
        "--rm",
        "-e",
        "GREETING=hi there",
        "-w",
        "/tmp",
        "--name",
        "c4",
        IMAGE,
        "sh",
        "-c",
        "echo $GREETING; pwd",
    )
    assert env.stdout == "hi there\n/tmp\n"
    assert rtctl("containers", "ls", "-q").stdout == ""
    assert not mounts_under(daemon.state / TASK_STATE)


def test_the_default_spec_is_confined(rtctl):
    status = rtctl("run", "--rm", "--name", "s1", IMAGE, "cat", "/proc/self/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"  # filtered
    assert fields["CapEff"].strip() == "00000000a80425fb"  # containerd's default set
    mounted = rtctl(
        "run",
        "--rm",
        "--name",
        "s2",
        IMAGE,
        "sh",
        "-c",
        "mount 2>/dev/null; cat /proc/kcore | wc -c",
        check=False,
    )
    assert mounted.stdout.strip().endswith("0")  # /proc/kcore is masked
    unshare = rtctl(
        "run", "--rm", "--name", "s3", IMAGE, "sh", "-c", "unshare -m true 2>/dev/null; echo $?", check=False
    )
    assert unshare.stdout.strip() != "0"


def test_detached_container_through_tasks_commands(rtctl, daemon):
    assert rtctl("run", "-d", "--name", "d1", IMAGE, "sh", "-c", "echo logged; sleep 300").stdout == "d1\n"
    tasks = json.loads(rtctl("tasks", "ls", "--format", "json").stdout)
    assert [(t["id"], t["status"]) for t in tasks] == [("d1", "running")]
    pid = tasks[0]["pid"]
    assert [p["pid"] for p in json.loads(rtctl("tasks", "ps", "d1", "--format", "json").stdout)] == [pid]
    assert (
        rtctl("tasks", "exec", "--exec-id", "e1", "d1", "sh", "-c", "echo in; exit 4", check=False).returncode
        == 4
    )
    rtctl("tasks", "pause", "d1")
    assert json.loads(rtctl("tasks", "ls", "--format", "json").stdout)[0]["status"] == "paused"
    rtctl("tasks", "resume", "d1")
    metrics = json.loads(rtctl("tasks", "metrics", "d1").stdout)
    assert metrics[0]["id"] == "d1" and metrics[0]["data"]["pids"]["current"] >= 1
    removed = rtctl("tasks", "rm", "d1", check=False)
    assert removed.returncode == 125 and "must be stopped" in removed.stderr
    rtctl("tasks", "rm", "-f", "d1")
    rtctl("containers", "rm", "d1")
    log = Path(daemon.root) / "io.containerd.runtime.v2.task" / "logs" / rtctl.namespace / "d1.log"
    deadline = time.monotonic() + 5
    while not log.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["stream"], r["log"]) for r in records] == [("stdout", "logged\n")]


def test_kill_uses_the_stop_signal_and_bad_input_exits_125(rtctl):
    rtctl(
        "run", "-d", "--name", "k1", IMAGE, "sh", "-c", "trap 'exit 42' TERM; while true; do sleep 0.1; done"
    )
    time.sleep(0.5)
    rtctl("tasks", "kill", "k1")  # the image's stop signal: SIGTERM
    deadline = time.monotonic() + 10
    while json.loads(rtctl("tasks", "ls", "--format", "json").stdout)[0]["status"] != "stopped":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert json.loads(rtctl("tasks", "ls", "--format", "json").stdout)[0]["exit_status"] == 42
    again = rtctl("tasks", "kill", "k1", check=False)
    assert again.returncode == 125 and "process already finished" in again.stderr
    rtctl("tasks", "rm", "k1")
    rtctl("containers", "rm", "k1")

    missing = rtctl("run", "--rm", "--name", "m1", "127.0.0.1:1/nope:1", "true", check=False)
    assert missing.returncode == 125 and "127.0.0.1:1" in missing.stderr.splitlines()[-1]
    runtime = rtctl(
        "run", "--rm", "--runtime", "io.example.nope.v1", "--name", "m2", IMAGE, "true", check=False
    )
    assert runtime.returncode == 125 and '"io.example.nope.v1"' in runtime.stderr
    assert rtctl("containers", "ls", "-q").stdout == ""  # --rm cleaned up the failed run
    twice = rtctl("run", "-d", "--name", "m3", IMAGE, "sleep", "300")
    assert twice.returncode == 0
    clash = rtctl("run", "-d", "--name", "m3", IMAGE, "sleep", "300", check=False)
    assert clash.returncode == 125 and "already in use" in clash.stderr
    rtctl("tasks", "rm", "-f", "m3")
    rtctl("containers", "rm", "m3")


def test_run_with_a_terminal(rtctl, daemon):
    argv = [sys.executable, "-m", "runtimed.cli.main", "-a", daemon.address, "-n", rtctl.namespace]
    argv += ["run", "-t", "--rm", "--name", "t1", IMAGE, "sh"]
    output, status = shell_on_a_terminal(argv, cwd=str(REPO_ROOT))
    assert b"/dev/pts/0" in output and b"sum=42" in output, output
    assert status == 7
    assert rtctl("containers", "ls", "-q").stdout == ""
