"""Tasks across daemon restarts and shim deaths (root only; real runc).

* kill -9 the daemon with five containers running; one exits while the daemon is down; a new
  daemon re-adopts all five: four RUNNING with their pids, one STOPPED with its real status;
  exec and kill work on the re-adopted ones.
* kill -9 a shim: its task is cleaned up (container killed, rootfs unmounted) and reported
  STOPPED with 137; a pending Wait returns; the task can be deleted; nothing leaks.
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
from fixtures.tasks import TASK_STATE, TaskRig, mounts_under, reap_leftovers, shim_processes, unique_namespace

from runtimed.api.containerd.events import task_pb2 as events_pb2
from runtimed.api.containerd.services.tasks.v1 import tasks_pb2
from runtimed.api.containerd.types.task import task_pb2

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, mounts)"),
]


@pytest.fixture
def namespace(daemon) -> Iterator[str]:
    namespace = unique_namespace("r")
    yield namespace
    leftovers = reap_leftovers(daemon.state, [namespace])
    assert not leftovers, f"test left {leftovers}"


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def shim_pid(daemon, namespace: str, container_id: str) -> int:
    record = daemon.state / TASK_STATE / namespace / container_id / "shim.json"
    return int(json.loads(record.read_text())["pid"])


def zygote_pids(daemon) -> list[int]:
    """The zygotes a daemon started, from its log (JSON lines)."""
    pids = []
    for line in daemon.log().splitlines():
        if "shim zygote started" in line:
            with contextlib.suppress(ValueError, KeyError):
                pids.append(int(json.loads(line)["pid"]))
    return pids


def test_five_containers_survive_a_daemon_kill(daemon, namespace, tmp_path):
    rig = TaskRig(daemon.address, namespace, tmp_path)
    pids = {}
    for i in range(4):
        rig.container(f"c{i}", ["sleep", "300"])
        rig.create_task(f"c{i}", rig.fifos(f"c{i}"))
        pids[f"c{i}"] = rig.start(f"c{i}")
    rig.container("c4", ["sh", "-c", "sleep 1; exit 4"])
    rig.create_task("c4", rig.fifos("c4"))
    pids["c4"] = rig.start("c4")
    rig.close()
    old_zygotes = [p for p in zygote_pids(daemon) if alive(p)]

    daemon.kill()
    time.sleep(2.0)  # c4 exits while no daemon runs
    assert not alive(pids["c4"]) and all(alive(pids[f"c{i}"]) for i in range(4))
    daemon.start()

    rig = TaskRig(daemon.address, namespace, tmp_path)
    listed = {t.id: t for t in rig.tasks.List(tasks_pb2.ListTasksRequest(), metadata=rig.md).tasks}
    assert sorted(listed) == ["c0", "c1", "c2", "c3", "c4"]
    for i in range(4):
        assert (listed[f"c{i}"].pid, listed[f"c{i}"].status) == (pids[f"c{i}"], task_pb2.RUNNING)
    assert (listed["c4"].status, listed["c4"].exit_status) == (task_pb2.STOPPED, 4)
    assert rig.wait("c4") == 4
    assert not [p for p in old_zygotes if alive(p)], "the dead daemon's zygote is still running"

    io = rig.fifos("e1")
    rig.exec("c0", "e1", ["sh", "-c", "echo re-adopted"], io)
    rig.start("c0", "e1")
    assert rig.wait("c0", "e1") == 0 and io.output() == "re-adopted\n"

    received, call = rig.subscribe(f'namespace=="{namespace}",topic=="/tasks/exit"')
    for i in range(4):
        rig.kill(f"c{i}", signal.SIGKILL)
        assert rig.wait(f"c{i}") == 137
    time.sleep(0.3)
    call.cancel()
    exits = sorted(events_pb2.TaskExit.FromString(e.event.value).container_id for e in received)
    assert exits == ["c0", "c1", "c2", "c3"]
    for i in range(5):
        rig.delete_task(f"c{i}")
        rig.remove_container(f"c{i}")
    rig.close()
    assert not mounts_under(daemon.state / TASK_STATE)


def test_a_killed_shim_leaves_a_stopped_task_and_nothing_else(daemon, namespace, tmp_path):
    rig = TaskRig(daemon.address, namespace, tmp_path)
    received, call = rig.subscribe(f'namespace=="{namespace}",topic=="/tasks/exit"')
    rig.container("k1", ["sleep", "300"])
    io = rig.fifos("k1")
    rig.create_task("k1", io)
    pid = rig.start("k1")
    waiter = rig.tasks.Wait.future(tasks_pb2.WaitRequest(container_id="k1"), metadata=rig.md, timeout=30)
    rootfs = daemon.state / TASK_STATE / namespace / "k1" / "rootfs"
    assert mounts_under(rootfs)

    os.kill(shim_pid(daemon, namespace, "k1"), signal.SIGKILL)
    assert waiter.result().exit_status == 137  # the container had to be killed
    process = rig.get("k1")
    assert (process.status, process.exit_status, process.pid) == (task_pb2.STOPPED, 137, pid)
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)
    assert not mounts_under(rootfs)
    code = None
    try:
        rig.kill("k1", signal.SIGTERM)
    except grpc.RpcError as exc:
        code = exc.code()
    assert code == grpc.StatusCode.NOT_FOUND
    time.sleep(0.2)
    call.cancel()
    exits = [events_pb2.TaskExit.FromString(e.event.value) for e in received]
    assert [(e.container_id, e.exit_status) for e in exits] == [("k1", 137)]

    assert rig.delete_task("k1").exit_status == 137
    rig.remove_container("k1")
    assert not (daemon.state / TASK_STATE / namespace / "k1").exists()
    assert not shim_processes(daemon.state)
    rig.close()


def test_a_shim_killed_while_the_daemon_is_down(daemon, namespace, tmp_path):
    rig = TaskRig(daemon.address, namespace, tmp_path)
    rig.container("k2", ["sleep", "300"])
    rig.create_task("k2", rig.fifos("k2"))
    pid = rig.start("k2")
    rig.close()
    daemon.kill()
    os.kill(shim_pid(daemon, namespace, "k2"), signal.SIGKILL)
    daemon.start()
    rig = TaskRig(daemon.address, namespace, tmp_path)
    process = rig.get("k2")
    assert (process.status, process.exit_status) == (task_pb2.STOPPED, 137)
    assert rig.wait("k2") == 137
    assert not alive(pid)
    assert not mounts_under(daemon.state / TASK_STATE)
    # A second restart keeps the same answer, from the record of the settled exit.
    rig.close()
    daemon.kill()
    daemon.start()
    rig = TaskRig(daemon.address, namespace, tmp_path)
    assert rig.get("k2").exit_status == 137
    rig.delete_task("k2")
    rig.remove_container("k2")
    rig.close()
