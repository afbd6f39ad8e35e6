"""containerd's `ctr` running containers on runtimed (root only; real runc).

Each test imports the busybox test image into its own namespace with `ctr images import`, so
its cgroups are /sys/fs/cgroup/*/<namespace>/..., and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.archives import oci_archive
from fixtures.images import busybox_image
from fixtures.tasks import (
    TASK_STATE,
    mounts_under,
    reap_leftovers,
    shell_on_a_terminal,
    shim_processes,
    unique_namespace,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, mounts)"),
]

IMAGE = "docker.io/library/busybox:rtd"


@pytest.fixture
def namespace(daemon, run_ctr, tmp_path) -> Iterator[str]:
    namespace = unique_namespace("i")
    archive = tmp_path / "busybox.tar"
    archive.write_bytes(oci_archive([(IMAGE, busybox_image())]))
    run_ctr(daemon.address, "images", "import", str(archive), namespace=namespace)
    yield namespace
    leftovers = reap_leftovers(daemon.state, [namespace])
    assert not leftovers, f"test left {leftovers}"


def test_run_rm_prints_and_exits_with_the_process_s_status(daemon, run_ctr, namespace):
    result = run_ctr(daemon.address, "run", "--rm", IMAGE, "c1", "echo", "hi", namespace=namespace)
    assert result.stdout == "hi\n"
    result = run_ctr(
        daemon.address, "run", "--rm", IMAGE, "c2", "sh", "-c", "exit 3", namespace=namespace, check=False
    )
    assert result.returncode == 3
    assert run_ctr(daemon.address, "containers", "ls", "-q", namespace=namespace).stdout == ""
    assert run_ctr(daemon.address, "tasks", "ls", namespace=namespace).stdout.splitlines()[1:] == []
    assert not mounts_under(daemon.state / TASK_STATE)


def test_detached_container_exec_kill_delete(daemon, run_ctr, namespace):
    ctr = lambda *args, **kw: run_ctr(daemon.address, *args, namespace=namespace, **kw)  # noqa: E731
    ctr("run", "-d", IMAGE, "d1", "sleep", "300")
    rows = [line.split() for line in ctr("tasks", "ls").stdout.splitlines()[1:]]
    assert len(rows) == 1 and rows[0][0] == "d1" and rows[0][2] == "RUNNING"
    pid = int(rows[0][1])

    ps = ctr("tasks", "exec", "--exec-id", "e1", "d1", "ps").stdout
    assert "sleep 300" in ps and "ps" in ps
    assert ctr("tasks", "exec", "--exec-id", "e2", "d1", "sh", "-c", "exit 5", check=False).returncode == 5
    pids = ctr("tasks", "ps", "d1").stdout.splitlines()[1:]
    assert [line.split()[0] for line in pids] == [str(pid)]

    # A used exec id, while its process runs.
    ctr("tasks", "exec", "-d", "--exec-id", "long", "d1", "sleep", "300")
    again = ctr("tasks", "exec", "--exec-id", "long", "d1", "true", check=False)
    assert again.returncode != 0 and "already exists" in again.stderr

    ctr("tasks", "pause", "d1")
    assert "PAUSED" in ctr("tasks", "ls").stdout
    ctr("tasks", "resume", "d1")
    ctr("tasks", "kill", "--signal", "SIGKILL", "d1")
    deadline = time.monotonic() + 10
    while "STOPPED" not in ctr("tasks", "ls").stdout and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "STOPPED" in ctr("tasks", "ls").stdout
    killed = ctr("tasks", "kill", "d1", check=False)
    assert killed.returncode != 0 and "process already finished: not found" in killed.stderr
    deleted = ctr("tasks", "delete", "d1")
    assert "exit with non-zero exit code 137" in deleted.stderr
    ctr("containers", "rm", "d1")
    assert ctr("tasks", "ls").stdout.splitlines()[1:] == []
    assert ctr("containers", "ls", "-q").stdout == ""
    deadline = time.monotonic() + 10
    while shim_processes(daemon.state) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not shim_processes(daemon.state)


def test_ctr_events_sees_the_task_events(daemon, run_ctr, ctr_bin, namespace):
    events = subprocess.Popen(
        [ctr_bin, "--address", daemon.address, "events", f"namespace=={namespace}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(0.5)
        run_ctr(daemon.address, "run", "--rm", IMAGE, "ev1", "true", namespace=namespace)
        run_ctr(daemon.address, "run", "-d", IMAGE, "ev2", "sleep", "300", namespace=namespace)
        run_ctr(daemon.address, "tasks", "exec", "--exec-id", "x1", "ev2", "true", namespace=namespace)
        run_ctr(daemon.address, "tasks", "kill", "-s", "SIGKILL", "ev2", namespace=namespace)
        time.sleep(0.5)
        run_ctr(daemon.address, "tasks", "delete", "ev2", namespace=namespace)
        run_ctr(daemon.address, "containers", "rm", "ev2", namespace=namespace)
        time.sleep(0.5)
    finally:
        events.send_signal(signal.SIGTERM)
        output, _ = events.communicate(timeout=10)
    topics = [line.split()[5] for line in output.splitlines() if len(line.split()) > 5]
    ev1 = [t for t, line in zip(topics, output.splitlines(), strict=False) if '"ev1"' in line]
    assert [t for t in ev1 if t.startswith("/tasks/")] == [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exit",
        "/tasks/delete",
    ]
    for topic in ("/tasks/exec-added", "/tasks/exec-started"):
        assert topic in topics, output
    assert "cannot unmarshal" not in output


def test_run_with_a_terminal(daemon, ctr_bin, namespace):
    argv = [ctr_bin, "--address", daemon.address, "-n", namespace, "run", "-t", "--rm", IMAGE, "t1", "sh"]
    output, status = shell_on_a_terminal(argv)
    assert b"/dev/pts/0" in output and b"sum=42" in output, output
    assert status == 7


def test_bad_runs_fail_cleanly(daemon, run_ctr, namespace):
    missing = run_ctr(
        daemon.address,
        "run",
        "--rm",
        "docker.io/library/nope:1",
        "m1",
        "true",
        namespace=namespace,
        check=False,
    )
    assert missing.returncode != 0 and "not found" in missing.stderr
    runtime = run_ctr(
        daemon.address,
        "run",
        "--rm",
        "--runtime",
        "io.example.nope.v1",
        IMAGE,
        "m2",
        "true",
        namespace=namespace,
        check=False,
    )
    assert runtime.returncode != 0 and "io.example.nope.v1" in runtime.stderr
    run_ctr(daemon.address, "containers", "rm", "m2", namespace=namespace, check=False)
    assert not list((daemon.state / TASK_STATE).glob(f"{namespace}/*"))
    assert not mounts_under(Path(daemon.state))


def test_tasks_metrics_decodes_cgroup_metrics(daemon, run_ctr, namespace):
    ctr = lambda *args, **kw: run_ctr(daemon.address, *args, namespace=namespace, **kw)  # noqa: E731
    ctr("run", "-d", "--memory-limit", str(64 * 1024 * 1024), IMAGE, "m1", "sleep", "300")
    try:
        table = ctr("tasks", "metrics", "m1").stdout
        assert table.splitlines()[0].split() == ["ID", "TIMESTAMP"]
        assert "m1" in table.splitlines()[1]
        # ctr prints the cgroup table only when it could decode the v1 or v2 Metrics.
        assert "METRIC" in table and "VALUE" in table, table
        assert "memory.usage_in_bytes" in table or "memory.usage" in table, table
        assert "pids.current" in table, table
        document = json.loads(ctr("tasks", "metrics", "--format", "json", "m1").stdout)
        memory = document["memory"]
        limit = (
            memory["usage"]["limit"]
            if "usage" in memory and isinstance(memory["usage"], dict)
            else memory["usage_limit"]
        )
        assert limit == 64 * 1024 * 1024
        assert document["pids"]["current"] >= 1
    finally:
        ctr("tasks", "kill", "-s", "SIGKILL", "m1")
        deadline = time.monotonic() + 10
        while "STOPPED" not in ctr("tasks", "ls").stdout and time.monotonic() < deadline:
            time.sleep(0.1)
        ctr("tasks", "delete", "m1")
        ctr("containers", "rm", "m1")
