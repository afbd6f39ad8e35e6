"""Tasks service against a real daemon, real runc and real processes (root only).

Each test works in its own namespace (so its cgroups are /sys/fs/cgroup/*/<namespace>/<id>) and
leaves nothing behind: the `rig` fixture kills by pid and removes whatever a failing test left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fixtures.tasks import (
    TASK_STATE,
    TaskRig,
    cgroups_of,
    mounts_under,
    reap_leftovers,
    shim_processes,
    unique_namespace,
)

from runtimed.api.containerd.cgroups.v1 import metrics_pb2 as cgroups_v1
from runtimed.api.containerd.cgroups.v2 import metrics_pb2 as cgroups_v2
from runtimed.api.containerd.events import task_pb2 as events_pb2
from runtimed.api.containerd.runc.options import oci_pb2
from runtimed.api.containerd.services.tasks.v1 import tasks_pb2
from runtimed.api.containerd.types.task import task_pb2

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, mounts)"),
]


@pytest.fixture
def rig(daemon, tmp_path) -> Iterator[TaskRig]:
    namespace = unique_namespace()
    rig = TaskRig(daemon.address, namespace, tmp_path)
    yield rig
    rig.close()
    leftovers = reap_leftovers(daemon.state, [namespace])
    assert not leftovers, f"test left {leftovers}"


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def assert_clean(daemon, rig: TaskRig, container_id: str) -> None:
    """Nothing of the task is left: directory, mounts, shim, cgroup leaf."""
    bundle = daemon.state / TASK_STATE / rig.namespace / container_id
    assert not bundle.exists(), sorted(os.listdir(bundle))
    assert not mounts_under(daemon.state / TASK_STATE)
    deadline = time.monotonic() + 10
    while shim_processes(daemon.state) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not shim_processes(daemon.state)
    for cgroup in cgroups_of(rig.namespace):
        assert not (Path(cgroup) / container_id).exists(), cgroup


def test_run_echo_prints_and_exits_zero(daemon, rig):
    received, call = rig.subscribe(f'namespace=="{rig.namespace}",topic~="/tasks/"')
    status, output = rig.run("c1", ["echo", "hi"])
    assert (status, output) == (0, "hi\n")
    time.sleep(0.3)
    call.cancel()
    topics = [e.topic for e in received]
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    assert {e.event.type_url for e in received} == {
        "containerd.events.TaskCreate",
        "containerd.events.TaskStart",
        "containerd.events.TaskExit",
        "containerd.events.TaskDelete",
    }
    exit_event = events_pb2.TaskExit.FromString(received[2].event.value)
    assert (exit_event.container_id, exit_event.id, exit_event.exit_status) == ("c1", "c1", 0)
    create = events_pb2.TaskCreate.FromString(received[0].event.value)
    assert create.bundle.endswith(f"/{rig.namespace}/c1") and create.pid == exit_event.pid
    assert_clean(daemon, rig, "c1")


def test_exit_status_is_the_process_s_and_128_plus_signal(daemon, rig):
    assert rig.run("c3", ["sh", "-c", "echo out; echo err >&2; exit 3"])[0] == 3
    rig.container("s1", ["sleep", "300"])
    rig.create_task("s1", rig.fifos("s1"))
    rig.start("s1")
    rig.kill("s1", signal.SIGKILL)
    assert rig.wait("s1") == 137
    process = rig.get("s1")
    assert process.status == task_pb2.STOPPED and process.exit_status == 137
    assert process.id == "s1" and not process.container_id and process.exited_at.seconds > 0
    deleted = rig.delete_task("s1")
    assert (deleted.exit_status, deleted.id) == (137, "")
    code, message = code_of(lambda: rig.get("s1"))
    assert code == grpc.StatusCode.NOT_FOUND and message == "task s1 not found: not found"
    rig.remove_container("s1")
    assert_clean(daemon, rig, "s1")


def test_stdout_and_stderr_are_separate_fifos(rig):
    rig.container("c2", ["sh", "-c", "echo to-out; echo to-err >&2"])
    io = rig.fifos("c2")
    rig.create_task("c2", io)
    rig.start("c2")
    assert rig.wait("c2") == 0
    assert io.output() == "to-out\n"
    assert io.output(stream="stderr") == "to-err\n"
    rig.delete_task("c2")
    rig.remove_container("c2")


def test_wait_may_come_before_start_and_get_reports_each_state(rig):
    rig.container("w1", ["sh", "-c", "read line; echo got $line; exit 4"])
    io = rig.fifos("w1")
    pid = rig.create_task("w1", io)
    assert rig.get("w1").status == task_pb2.CREATED and rig.get("w1").pid == pid
    waiter = rig.tasks.Wait.future(tasks_pb2.WaitRequest(container_id="w1"), metadata=rig.md, timeout=30)
    time.sleep(0.2)
    assert not waiter.done()
    assert rig.start("w1") == pid
    assert rig.get("w1").status == task_pb2.RUNNING
    listed = rig.tasks.List(tasks_pb2.ListTasksRequest(), metadata=rig.md).tasks
    assert [(t.id, t.pid, t.status) for t in listed] == [("w1", pid, task_pb2.RUNNING)]
    io.write(b"x\n")
    assert waiter.result().exit_status == 4
    assert io.output() == "got x\n"
    rig.delete_task("w1")
    rig.remove_container("w1")


def test_close_io_gives_the_process_eof(rig):
    rig.container("cat", ["sh", "-c", "cat; echo done"])
    io = rig.fifos("cat")
    rig.create_task("cat", io)
    rig.start("cat")
    io.write(b"one\n")
    time.sleep(0.3)
    assert rig.get("cat").status == task_pb2.RUNNING
    rig.tasks.CloseIO(tasks_pb2.CloseIORequest(container_id="cat", stdin=True), metadata=rig.md)
    assert rig.wait("cat") == 0
    assert io.output() == "one\ndone\n"
    rig.delete_task("cat")
    rig.remove_container("cat")


def test_exec_pids_and_exec_ids(daemon, rig):
    rig.container("d1", ["sleep", "300"])
    rig.create_task("d1", rig.fifos("d1"))
    init_pid = rig.start("d1")
    received, call = rig.subscribe(f'namespace=="{rig.namespace}"')

    io = rig.fifos("e1")
    rig.exec("d1", "e1", ["sh", "-c", "echo in-exec; sleep 300"], io)
    exec_pid = rig.start("d1", "e1")
    assert rig.get("d1", "e1").status == task_pb2.RUNNING
    assert rig.get("d1", "e1").id == "e1"

    code, message = code_of(lambda: rig.exec("d1", "e1", ["true"]))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "e1" in message
    code, _ = code_of(lambda: rig.start("d1", "e1"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION

    pids = rig.tasks.ListPids(tasks_pb2.ListPidsRequest(container_id="d1"), metadata=rig.md).processes
    by_pid = {p.pid: p for p in pids}
    assert init_pid in by_pid and exec_pid in by_pid
    assert not by_pid[init_pid].HasField("info")
    assert by_pid[exec_pid].info.type_url == "containerd.runc.v1.ProcessDetails"
    assert oci_pb2.ProcessDetails.FromString(by_pid[exec_pid].info.value).exec_id == "e1"

    code, _ = code_of(lambda: rig.delete_task("d1"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION  # running
    rig.kill("d1", signal.SIGKILL, exec_id="e1")
    assert rig.wait("d1", "e1") == 137
    assert io.output().startswith("in-exec")
    deleted = rig.tasks.DeleteProcess(
        tasks_pb2.DeleteProcessRequest(container_id="d1", exec_id="e1"), metadata=rig.md
    )
    assert (deleted.id, deleted.pid, deleted.exit_status) == ("e1", exec_pid, 137)
    code, message = code_of(lambda: rig.get("d1", "e1"))
    assert code == grpc.StatusCode.NOT_FOUND and message == "process does not exist e1: not found"

    rig.exec("d1", "e1", ["sh", "-c", "exit 6"])  # the id is free again
    rig.start("d1", "e1")
    assert rig.wait("d1", "e1") == 6

    rig.kill("d1", signal.SIGKILL)
    assert rig.wait("d1") == 137
    time.sleep(0.3)  # the stream delivers asynchronously
    call.cancel()
    topics = [(e.topic, _event_id(e)) for e in received]
    assert topics[:4] == [
        ("/tasks/exec-added", "e1"),
        ("/tasks/exec-started", "e1"),
        ("/tasks/exit", "e1"),
        ("/tasks/exec-added", "e1"),
    ]
    assert ("/tasks/exit", "d1") in topics
    rig.delete_task("d1")
    rig.remove_container("d1")
    assert_clean(daemon, rig, "d1")


def _event_id(envelope) -> str:
    if envelope.topic == "/tasks/exit":
        return events_pb2.TaskExit.FromString(envelope.event.value).id
    if envelope.topic.startswith("/tasks/exec"):
        message = events_pb2.TaskExecAdded.FromString(envelope.event.value)
        return message.exec_id
    return ""


def test_pause_resume_update_metrics(rig):
    rig.container("p1", ["sleep", "300"])
    rig.create_task("p1", rig.fifos("p1"))
    rig.start("p1")
    received, call = rig.subscribe(f'namespace=="{rig.namespace}"')
    rig.tasks.Pause(tasks_pb2.PauseTaskRequest(container_id="p1"), metadata=rig.md)
    assert rig.get("p1").status == task_pb2.PAUSED
    code, _ = code_of(lambda: rig.tasks.Pause(tasks_pb2.PauseTaskRequest(container_id="p1"), metadata=rig.md))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    rig.tasks.Resume(tasks_pb2.ResumeTaskRequest(container_id="p1"), metadata=rig.md)
    assert rig.get("p1").status == task_pb2.RUNNING

    resources = {"pids": {"limit": 64}}
    rig.tasks.Update(
        tasks_pb2.UpdateTaskRequest(
            container_id="p1",
            resources={
                "type_url": "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
                "value": json.dumps(resources).encode(),
            },
        ),
        metadata=rig.md,
    )
    metrics = rig.tasks.Metrics(tasks_pb2.MetricsRequest(filters=["id==p1"]), metadata=rig.md).metrics
    assert [m.id for m in metrics] == ["p1"]
    assert metrics[0].data.type_url in (
        "io.containerd.cgroups.v1.Metrics",
        "io.containerd.cgroups.v2.Metrics",
    )
    data = (cgroups_v1 if metrics[0].data.type_url.endswith("v1.Metrics") else cgroups_v2).Metrics.FromString(
        metrics[0].data.value
    )
    assert data.pids.limit == 64 and data.pids.current >= 1
    assert data.memory.usage  # bytes in use: v1 MemoryEntry usage, v2 a number
    assert rig.tasks.Metrics(tasks_pb2.MetricsRequest(filters=["id==nope"]), metadata=rig.md).metrics == []

    rig.kill("p1", signal.SIGKILL)
    rig.wait("p1")
    time.sleep(0.3)
    call.cancel()
    assert [e.topic for e in received][:2] == ["/tasks/paused", "/tasks/resumed"]
    rig.delete_task("p1")
    rig.remove_container("p1")


def test_bad_input_gets_the_right_codes_and_leaks_nothing(daemon, rig):
    # An unknown runtime name, and a known one without a backend here.
    rig.container("rt1", ["true"], runtime="io.example.nope.v1")
    code, message = code_of(lambda: rig.create_task("rt1"))
    assert code == grpc.StatusCode.NOT_FOUND and '"io.example.nope.v1"' in message
    rig.container("rt2", ["true"], runtime="io.containerd.kata.v2")
    code, message = code_of(lambda: rig.create_task("rt2"))
    assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
    assert '"io.containerd.kata.v2"' in message

    # No such container / task.
    ghost = tasks_pb2.CreateTaskRequest(container_id="ghost")
    code, message = code_of(lambda: rig.tasks.Create(ghost, metadata=rig.md))
    assert code == grpc.StatusCode.NOT_FOUND and message == 'container "ghost": not found'
    for call in (
        lambda: rig.start("ghost"),
        lambda: rig.wait("ghost"),
        lambda: rig.kill("ghost"),
        lambda: rig.delete_task("ghost"),
    ):
        code, message = code_of(call)
        assert code == grpc.StatusCode.NOT_FOUND and message == "task ghost not found: not found"

    # A bad exec id, a second create, a second start, a kill of a stopped task, checkpoint.
    rig.container("b1", ["sh", "-c", "exit 2"])
    rig.create_task("b1", rig.fifos("b1"))
    code, _ = code_of(lambda: rig.create_task("b1"))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, _ = code_of(lambda: rig.exec("b1", "bad/id", ["true"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    rig.start("b1")
    assert rig.wait("b1") == 2
    code, message = code_of(lambda: rig.start("b1"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "cannot start a stopped" in message
    code, message = code_of(lambda: rig.kill("b1", signal.SIGTERM))
    assert code == grpc.StatusCode.NOT_FOUND and message == "process already finished: not found"
    code, _ = code_of(lambda: rig.exec("b1", "e9", ["true"]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code, _ = code_of(
        lambda: rig.tasks.Checkpoint(tasks_pb2.CheckpointTaskRequest(container_id="b1"), metadata=rig.md)
    )
    assert code == grpc.StatusCode.UNIMPLEMENTED
    rig.delete_task("b1")

    # A command that does not exist in the image: runc's own error, nothing left behind.
    rig.container("b2", ["/no/such/binary"])
    code, message = code_of(lambda: rig.create_task("b2", rig.fifos("b2")))
    assert "/no/such/binary" in message and "no such file or directory" in message, message
    # The workload's fault, not a runtimed bug: UNKNOWN as containerd reports it, never INTERNAL.
    assert code == grpc.StatusCode.UNKNOWN, code
    assert rig.tasks.List(tasks_pb2.ListTasksRequest(), metadata=rig.md).tasks == []
    for container_id in ("rt1", "rt2", "b1", "b2"):
        rig.remove_container(container_id)
        assert_clean(daemon, rig, container_id)


def test_created_task_can_be_deleted_without_start(daemon, rig):
    rig.container("n1", ["sleep", "300"])
    pid = rig.create_task("n1", rig.fifos("n1"))
    assert rig.get("n1").status == task_pb2.CREATED
    deleted = rig.delete_task("n1")
    assert deleted.pid == pid
    rig.remove_container("n1")
    assert_clean(daemon, rig, "n1")


def test_file_log_uri_and_null_io(rig, tmp_path):
    log = tmp_path / "logs" / "l1.log"
    rig.container("l1", ["sh", "-c", "echo to-log; echo err-log >&2"])
    request = tasks_pb2.CreateTaskRequest(
        container_id="l1", rootfs=rig.mounts("l1"), stdout=f"file://{log}", stderr=f"file://{log}"
    )
    rig.tasks.Create(request, metadata=rig.md)
    rig.start("l1")
    assert rig.wait("l1") == 0
    assert sorted(log.read_text().splitlines()) == ["err-log", "to-log"]
    rig.delete_task("l1")
    rig.container("n2", ["sh", "-c", "echo nowhere"])
    rig.create_task("n2")  # no stdio at all: /dev/null
    rig.start("n2")
    assert rig.wait("n2") == 0
    rig.delete_task("n2")
    request = tasks_pb2.CreateTaskRequest(container_id="n2", rootfs=rig.mounts("n2"), stdout="binary:///x")
    code, message = code_of(lambda: rig.tasks.Create(request, metadata=rig.md))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "binary" in message
    for container_id in ("l1", "n2"):
        rig.remove_container(container_id)


def _oom_reported_here() -> bool:
    """The kernel counts OOM kills per memory cgroup (cgroup v1 memory.oom_control or v2
    memory.events with an `oom_kill` line), which is how runtimed learns of them."""
    root = Path("/sys/fs/cgroup")
    for name in ("memory/memory.oom_control", "memory.events"):
        with contextlib.suppress(OSError):
            if "oom_kill " in (root / name).read_text():
                return True
    # v2: the root has no memory.events; a child cgroup does.
    return (root / "cgroup.controllers").exists() and "memory" in (root / "cgroup.controllers").read_text()


@pytest.mark.skipif(not _oom_reported_here(), reason="this kernel does not count OOM kills per memory cgroup")
def test_oom_kill_publishes_task_oom(rig):
    limit = 8 * 1024 * 1024
    spec = rig.spec("o1", ["sh", "-c", "x=$(head -c 64m /dev/zero | tr '\\0' a)"])
    spec["linux"].setdefault("resources", {})["memory"] = {"limit": limit, "swap": limit}
    received, call = rig.subscribe(f'namespace=="{rig.namespace}",topic~="/tasks/"')
    rig.container("o1", [], spec=spec)
    rig.create_task("o1", rig.fifos("o1"))
    rig.start("o1")
    assert rig.wait("o1") == 137
    rig.delete_task("o1")
    rig.remove_container("o1")
    time.sleep(0.3)
    call.cancel()
    topics = [e.topic for e in received]
    assert "/tasks/oom" in topics, topics
    oom = next(e for e in received if e.topic == "/tasks/oom")
    assert oom.event.type_url == "containerd.events.TaskOOM"
    assert events_pb2.TaskOOM.FromString(oom.event.value).container_id == "o1"
    assert topics.index("/tasks/oom") < topics.index("/tasks/exit")
