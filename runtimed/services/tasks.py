"""Tasks service: containerd's Tasks API over the task manager (runtimed.tasks.manager).

Wire details ctr relies on: Get/List fill Process.id (the container id for the init, the exec
id for an exec) and leave container_id empty; Delete leaves DeleteResponse.id empty and
DeleteProcess sets it to the exec id; Wait is a long poll that may arrive before Start; an
unknown task is NOT_FOUND "task X not found" (ctr treats that as "no task").
"""

from __future__ import annotations

import json
import signal
import time

import structlog
from google.protobuf import any_pb2, empty_pb2

from runtimed.api.containerd.runc.options import oci_pb2
from runtimed.api.containerd.services.tasks.v1 import tasks_pb2 as pb
from runtimed.api.containerd.services.tasks.v1 import tasks_pb2_grpc as pb_grpc
from runtimed.api.containerd.types import metrics_pb2
from runtimed.api.containerd.types.task import task_pb2
from runtimed.errors import InvalidArgument, NotImplementedYet, q
from runtimed.server.interceptors import current_namespace
from runtimed.services.base import grpc_plugin
from runtimed.services.convert import any_to_core, timestamp
from runtimed.tasks.manager import TASK_MANAGER_TYPE, TaskManager
from runtimed.tasks.metrics import runc_to_any
from runtimed.types import Mount
from shim.api import ExitInfo, ProcessState, Status, Stdio

log = structlog.get_logger("runtimed.tasks")

_STATUS = {
    Status.UNKNOWN: task_pb2.UNKNOWN,
    Status.CREATED: task_pb2.CREATED,
    Status.RUNNING: task_pb2.RUNNING,
    Status.STOPPED: task_pb2.STOPPED,
    Status.PAUSED: task_pb2.PAUSED,
    Status.PAUSING: task_pb2.PAUSING,
}
# The highest signal number (SIGRTMAX); anything else makes runc fail, which is the client's error.
MAX_SIGNAL = int(max(signal.valid_signals()))
METRICS_TYPE_PREFIX = "types.runtimed.io/"  # + the backend's stats type; the value is JSON


def process_to_pb(state: ProcessState) -> task_pb2.Process:
    return task_pb2.Process(
        id=state.exec_id or state.container_id,
        pid=state.pid,
        status=_STATUS.get(state.status, task_pb2.UNKNOWN),
        stdin=state.stdin,
        stdout=state.stdout,
        stderr=state.stderr,
        terminal=state.terminal,
        exit_status=state.exit_status,
        exited_at=timestamp(state.exited_at),
    )


def delete_response(info: ExitInfo, exec_id: str = "") -> pb.DeleteResponse:
    return pb.DeleteResponse(
        id=exec_id, pid=info.pid, exit_status=info.exit_status, exited_at=timestamp(info.exited_at)
    )


class TasksServicer(pb_grpc.TasksServicer):
    def __init__(self, manager: TaskManager) -> None:
        self._tasks = manager

    async def Create(self, request, context):
        if request.runtime_path:
            log.debug(
                "ignoring runtime_path: runtimed selects backends by runtime name", path=request.runtime_path
            )
        task = await self._tasks.create(
            current_namespace(),
            request.container_id,
            rootfs=[Mount(m.type, m.source, m.target, list(m.options)) for m in request.rootfs],
            stdio=Stdio(request.stdin, request.stdout, request.stderr, request.terminal),
            options=any_to_core(request.options, request.HasField("options")),
            checkpoint=request.HasField("checkpoint") and bool(request.checkpoint.digest),
        )
        return pb.CreateTaskResponse(container_id=task.id, pid=task.pid)

    async def Start(self, request, context):
        pid = await self._tasks.start(current_namespace(), request.container_id, request.exec_id)
        return pb.StartResponse(pid=pid)

    async def Delete(self, request, context):
        return delete_response(await self._tasks.delete(current_namespace(), request.container_id))

    async def DeleteProcess(self, request, context):
        info = await self._tasks.delete_process(current_namespace(), request.container_id, request.exec_id)
        return delete_response(info, request.exec_id)

    async def Get(self, request, context):
        state = await self._tasks.state(current_namespace(), request.container_id, request.exec_id)
        return pb.GetResponse(process=process_to_pb(state))

    async def List(self, request, context):
        states = await self._tasks.list(current_namespace())
        return pb.ListTasksResponse(tasks=[process_to_pb(s) for s in states])

    async def Kill(self, request, context):
        if not 0 <= request.signal <= MAX_SIGNAL:
            raise InvalidArgument(
                f"kill task {q(request.container_id)}: signal {request.signal} is not a signal number "
                f"(1-{MAX_SIGNAL}, or 0 for SIGTERM)"
            )
        await self._tasks.kill(
            current_namespace(), request.container_id, request.exec_id, request.signal, request.all
        )
        return empty_pb2.Empty()

    async def Exec(self, request, context):
        await self._tasks.exec(
            current_namespace(),
            request.container_id,
            request.exec_id,
            any_to_core(request.spec, request.HasField("spec")),
            Stdio(request.stdin, request.stdout, request.stderr, request.terminal),
        )
        return empty_pb2.Empty()

    async def ResizePty(self, request, context):
        await self._tasks.resize_pty(
            current_namespace(), request.container_id, request.exec_id, request.width, request.height
        )
        return empty_pb2.Empty()

    async def CloseIO(self, request, context):
        if request.stdin:
            await self._tasks.close_io(current_namespace(), request.container_id, request.exec_id)
        return empty_pb2.Empty()

    async def Pause(self, request, context):
        await self._tasks.pause(current_namespace(), request.container_id)
        return empty_pb2.Empty()

    async def Resume(self, request, context):
        await self._tasks.resume(current_namespace(), request.container_id)
        return empty_pb2.Empty()

    async def ListPids(self, request, context):
        processes = await self._tasks.pids(current_namespace(), request.container_id)
        infos = []
        for process in processes:
            info = task_pb2.ProcessInfo(pid=process.pid)
            if process.exec_id:  # what containerd's runc shim says; ctr ps decodes it
                details = oci_pb2.ProcessDetails(exec_id=process.exec_id)
                info.info.CopyFrom(
                    any_pb2.Any(type_url=details.DESCRIPTOR.full_name, value=details.SerializeToString())
                )
            infos.append(info)
        return pb.ListPidsResponse(processes=infos)

    async def Checkpoint(self, request, context):
        raise NotImplementedYet(
            f"checkpoint of task {request.container_id}: checkpoint/restore is not supported by runtimed"
        )

    async def Update(self, request, context):
        await self._tasks.update(
            current_namespace(),
            request.container_id,
            any_to_core(request.resources, request.HasField("resources")),
            dict(request.annotations),
        )
        return empty_pb2.Empty()

    async def Metrics(self, request, context):
        found = await self._tasks.metrics(current_namespace(), list(request.filters))
        now = time.time_ns()
        metrics = []
        for task, stats in found:
            data = runc_to_any(stats.type, stats.data)
            if data is None:  # a backend's own document: JSON, typed by the backend
                data = any_pb2.Any(type_url=METRICS_TYPE_PREFIX + stats.type, value=_json(stats.data))
            metrics.append(metrics_pb2.Metric(timestamp=timestamp(now), id=task.id, data=data))
        return pb.MetricsResponse(metrics=metrics)

    async def Wait(self, request, context):
        info = await self._tasks.wait(current_namespace(), request.container_id, request.exec_id)
        return pb.WaitResponse(exit_status=info.exit_status, exited_at=timestamp(info.exited_at))


def _json(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


PLUGINS = [
    grpc_plugin(
        "tasks",
        "containerd.services.tasks.v1.Tasks",
        lambda ctx: TasksServicer(ctx.plugins.get_single(TASK_MANAGER_TYPE)),
        pb_grpc.add_TasksServicer_to_server,
        requires=["*"],
    )
]
