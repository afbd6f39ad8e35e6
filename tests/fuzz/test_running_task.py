"""Fuzzing the Tasks service against a real running task (root, runc).

Hostile exec ids, exec specs, signals, pty sizes, resources and annotations aimed at one running
container. Properties: the daemon stays up, no INTERNAL (UNKNOWN only where the workload or runc
itself failed: Exec/Start/Update/Pause/Resume), messages present, and the task is still running
afterwards (the fuzzed signals are ones `sleep` survives).
"""

from __future__ import annotations

import contextlib
import os
import signal

import grpc
import pytest
import strategies as fs
from fixtures.tasks import TaskRig, reap_leftovers
from google.protobuf import any_pb2
from harness import FORBIDDEN
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from runtimed.api.containerd.services.tasks.v1 import tasks_pb2
from runtimed.api.containerd.types.task import task_pb2

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, mounts)"),
]

NAMESPACE = "fuzz-run"
CONTAINER = "run1"
PROCESS_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
# Signals sleep(1) as pid 1 of a container survives (pid 1 ignores what it does not handle).
HARMLESS_SIGNALS = st.sampled_from([0, -1, 18, 28, 64, 65, 1000, 2**31 - 1, -(2**31), int(signal.SIGUSR1)])
WORKLOAD = {"Exec", "Start", "Update", "Pause", "Resume"}  # may fail in runc: UNKNOWN is honest there

EXEC_SPECS = st.one_of(
    st.sampled_from(
        [
            b"",
            b"[]",
            b"1",
            b"null",
            b"{}",
            b'{"args": []}',
            b'{"args": ["/nonexistent"], "cwd": "/"}',
            b'{"args": ["true"], "cwd": "relative"}',
            b'{"args": "true"}',
            b'{"args": ["true"], "cwd": "/", "user": {"uid": -1}}',
            b'{"args": ["true"], "cwd": "/", "env": [1, 2]}',
            b'{"args": ["true\\u0000x"], "cwd": "/"}',
            b"\xff\xfe",
        ]
    ),
    st.binary(max_size=40),
)

OVERRIDES = {
    "container_id": st.just(CONTAINER),
    "signal": HARMLESS_SIGNALS,
    "stdin": st.just(""),
    "stdout": st.just(""),
    "stderr": st.just(""),
    "value": EXEC_SPECS,
    "type_url": st.sampled_from([PROCESS_URL, PROCESS_URL, "", "bogus"]),
    "exec_id": st.one_of(st.sampled_from(["e1", "e2", ""]), fs.hostile_text),
}
METHODS = {
    "Exec": tasks_pb2.ExecProcessRequest,
    "Start": tasks_pb2.StartRequest,
    "Kill": tasks_pb2.KillRequest,
    "ResizePty": tasks_pb2.ResizePtyRequest,
    "CloseIO": tasks_pb2.CloseIORequest,
    "Update": tasks_pb2.UpdateTaskRequest,
    "Get": tasks_pb2.GetRequest,
    "ListPids": tasks_pb2.ListPidsRequest,
    "DeleteProcess": tasks_pb2.DeleteProcessRequest,
    "Wait": tasks_pb2.WaitRequest,
    "Pause": tasks_pb2.PauseTaskRequest,
    "Resume": tasks_pb2.ResumeTaskRequest,
}
RESPONSES = {
    "Start": tasks_pb2.StartResponse,
    "Get": tasks_pb2.GetResponse,
    "ListPids": tasks_pb2.ListPidsResponse,
    "DeleteProcess": tasks_pb2.DeleteResponse,
    "Wait": tasks_pb2.WaitResponse,
}


def cases():
    def for_method(name):
        return st.tuples(st.just(name), fs.requests(METHODS[name], OVERRIDES))

    return st.sampled_from(sorted(METHODS)).flatmap(for_method)


@pytest.fixture(scope="module")
def running(fuzz, tmp_path_factory):
    rig = TaskRig(fuzz.daemon.address, NAMESPACE, tmp_path_factory.mktemp("fifos"))
    try:
        rig.container(CONTAINER, ["sleep", "600"])
        rig.create_task(CONTAINER)
        rig.start(CONTAINER)
        yield rig
    finally:
        with contextlib.suppress(grpc.RpcError):
            rig.kill(CONTAINER)
            rig.wait(CONTAINER, timeout=15)
            rig.delete_task(CONTAINER)
        rig.close()
        leftovers = reap_leftovers(fuzz.daemon.state, [NAMESPACE])
        assert not leftovers, f"fuzzing left {leftovers}"


@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=cases())
# runc's "invalid argument" for a signal number out of range came back as UNKNOWN.
@example(case=("Kill", tasks_pb2.KillRequest(container_id=CONTAINER, signal=2**31 - 1)))
@example(case=("Exec", tasks_pb2.ExecProcessRequest(container_id=CONTAINER, exec_id="e1")))
def test_fuzz_running_task(fuzz, running, case):
    name, request = case
    kind = "uu"
    method = fuzz.method(
        "containerd.services.tasks.v1.Tasks", name, METHODS[name], RESPONSES.get(name, _Empty), kind
    )
    outcome = fuzz.call(method, request, NAMESPACE, timeout=2.0 if name == "Wait" else 15.0)
    fuzz.alive()
    what = f"Tasks/{name} {str(request)[:400]!r}"
    try:
        if name == "Wait" and outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return  # waiting for an exec that was added but never started
        forbidden = FORBIDDEN - ({grpc.StatusCode.UNKNOWN} if name in WORKLOAD else set())
        assert outcome.code not in forbidden, f"{what} -> {outcome.code.name}: {outcome.details}"
        if not outcome.ok:
            assert outcome.details.strip(), f"{what} -> {outcome.code.name} without a message"
    finally:
        # Back to one running task and no exec, whatever the case did.
        with contextlib.suppress(grpc.RpcError):
            if running.get(CONTAINER).status == task_pb2.PAUSED:
                running.tasks.Resume(tasks_pb2.ResumeTaskRequest(container_id=CONTAINER), metadata=running.md)
        for exec_id in {"e1", "e2", request.exec_id if hasattr(request, "exec_id") else ""} - {""}:
            with contextlib.suppress(grpc.RpcError, ValueError):
                running.kill(CONTAINER, signal.SIGKILL, exec_id=exec_id)
            with contextlib.suppress(grpc.RpcError, ValueError):
                running.tasks.DeleteProcess(
                    tasks_pb2.DeleteProcessRequest(container_id=CONTAINER, exec_id=exec_id),
                    metadata=running.md,
                    timeout=10,
                )
    assert running.get(CONTAINER).status == task_pb2.RUNNING, f"after {what}"


class _Empty:
    @staticmethod
    def FromString(data: bytes):
        from google.protobuf import empty_pb2

        return empty_pb2.Empty.FromString(data)


@pytest.mark.parametrize("document", [b"1", b'"text"', b"null"])
def test_exec_spec_that_is_not_an_object(fuzz, running, document):
    exec_request = tasks_pb2.ExecProcessRequest(
        container_id=CONTAINER, exec_id="e9", spec=any_pb2.Any(type_url=PROCESS_URL, value=document)
    )
    exec_ = fuzz.method(
        "containerd.services.tasks.v1.Tasks", "Exec", tasks_pb2.ExecProcessRequest, _Empty, "uu"
    )
    outcome = fuzz.call(exec_, exec_request, NAMESPACE)
    with contextlib.suppress(grpc.RpcError):
        running.tasks.DeleteProcess(
            tasks_pb2.DeleteProcessRequest(container_id=CONTAINER, exec_id="e9"),
            metadata=running.md,
            timeout=10,
        )
    fuzz.alive()
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (outcome.code, outcome.details)
