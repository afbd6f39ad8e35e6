"""The task manager: tasks per (namespace, container), their shims, events and re-adoption.

A task is a container's running incarnation: a bundle directory (runtimed.tasks.bundle), a shim
process that supervises its processes (shim.server, started through the zygote), and the
runtime backend's `Shim` object that drives the runtime (plugins.runtimes.*), chosen by the
container's runtime name.

Events, with containerd's messages and its order per process (create -> start -> exit ->
delete; exec-added -> exec-started -> exit): /tasks/create, /tasks/start, /tasks/exit,
/tasks/delete, /tasks/exec-added, /tasks/exec-started, /tasks/paused, /tasks/resumed, and
/tasks/oom, which a backend reports through its TaskContext.on_oom (before the exit of an init
process the OOM killed). A start
holds its process's lifecycle lock until /tasks/start is out, and an exit waits for that lock,
so a process that dies at once is never reported exited before it is reported started.

Restart: at start-up every bundle is re-adopted in parallel (a bounded number at a time, each
under a timeout): its shim is connected, reports what it holds, and delivers the exits it
queued while the daemon was away. A task whose shim is gone (at start-up or later: the
connection ends without a shutdown) is cleaned up by its backend (kill, delete, unmount), is
reported exited with the status the backend could establish (137 when it had to be killed, 255
when the status is lost), and stays STOPPED until it is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import structlog
from google.protobuf.message import Message

from runtimed import filters, identifiers
from runtimed.api.containerd.events import task_pb2 as events_pb2
from runtimed.api.containerd.types import mount_pb2
from runtimed.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    NotImplementedYet,
    RuntimedError,
    Unavailable,
    q,
)
from runtimed.events.exchange import Exchange
from runtimed.metadata.containers import ContainerStore
from runtimed.plugin import ALL, InitContext, PluginType, Registration
from runtimed.services.convert import timestamp
from runtimed.tasks import bundle as bundles
from runtimed.tasks.client import ShimClient, runtimed_error
from runtimed.tasks.launcher import ShimLauncher
from runtimed.tasks.runtime import Runtimes, TaskContext
from runtimed.types import Mount
from shim import api
from shim.api import ExitInfo, ProcessInfo, ProcessState, Shim, Stats, Status, Stdio

log = structlog.get_logger("runtimed.tasks")

SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
RESOURCES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
MAX_SOCKET_PATH = 107
LOAD_CONCURRENCY = 16
LOAD_TIMEOUT = 15.0

P = ParamSpec("P")
R = TypeVar("R")


def shim_errors(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Backends may raise shim.api errors; callers of the manager see runtimed's."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except api.ShimError as exc:
            raise runtimed_error(exc) from exc

    return wrapper


@dataclass
class Task:
    namespace: str
    id: str
    runtime: str
    bundle: Path
    shim: Shim
    client: ShimClient
    stdio: Stdio
    rootfs: list[Mount] = field(default_factory=list)
    pid: int = 0
    created_at: int = 0
    # Set when the shim process died: the init's exit as the backend settled it.
    dead: ExitInfo | None = None
    died: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # restored; events may flow
    deleting: bool = False
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def lifecycle(self, exec_id: str) -> asyncio.Lock:
        return self.locks.setdefault(exec_id, asyncio.Lock())


class TaskManager:
    def __init__(
        self,
        *,
        state: Path,
        socket_dir: Path,
        containers: ContainerStore,
        events: Exchange,
        runtimes: Runtimes,
        launcher: ShimLauncher,
    ) -> None:
        self.state_dir = state
        self.socket_dir = socket_dir
        self.containers = containers
        self.events = events
        self.runtimes = runtimes
        self.launcher = launcher
        self._tasks: dict[tuple[str, str], Task] = {}
        self._creating: set[tuple[str, str]] = set()
        self._background: set[asyncio.Task[Any]] = set()

    # -- helpers ------------------------------------------------------------------------------

    def _spawn_background(self, coroutine: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coroutine)
        task.set_name(name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _publish(self, namespace: str, topic: str, event: Message) -> None:
        self.events.publish(namespace, topic, event)

    def get(self, namespace: str, container_id: str) -> Task:
        identifiers.validate(container_id, "container id")
        task = self._tasks.get((namespace, container_id))
        if task is None:
            raise NotFound(f"task {container_id} not found")
        return task

    def tasks(self, namespace: str) -> list[Task]:
        return [t for (ns, _), t in sorted(self._tasks.items()) if ns == namespace]

    def socket_path(self, namespace: str, container_id: str) -> str:
        digest = hashlib.sha256(f"{namespace}/{container_id}".encode()).hexdigest()[:32]
        return str(self.socket_dir / f"{digest}.sock")

    def _connect_handlers(self, task: Task) -> None:
        task.client.on_event = lambda event: self._spawn_background(
            self._on_event(task, event), f"exit-{task.namespace}/{task.id}"
        )
        task.client.on_close = lambda: self._on_close(task)

    async def _on_event(self, task: Task, event: api.Event) -> None:
        await task.ready.wait()
        if event.topic != "exit":
            return
        async with task.lifecycle(event.exec_id):
            if task.deleting:
                return  # its delete settles (and reports) the exit
            self._report_exit(task, event)

    def _report_exit(self, task: Task, event: api.Event) -> None:
        """Record an exit with the backend and publish /tasks/exit, once per process, whoever
        learns of it first: the shim's event, a Wait's answer, or a Delete (which must not be
        published before it). Call with the process's lifecycle lock held."""
        if not task.shim.exited(event):
            return
        self._publish(
            task.namespace,
            "/tasks/exit",
            events_pb2.TaskExit(
                container_id=task.id,
                id=event.exec_id or task.id,
                pid=event.pid,
                exit_status=event.exit_status,
                exited_at=timestamp(event.exited_at),
            ),
        )
        log.debug("process exited", namespace=task.namespace, container=task.id, exec_id=event.exec_id,
                  exit_status=event.exit_status)  # fmt: skip

    def _oom_reporter(self, namespace: str, container_id: str) -> Callable[[], None]:
        def report() -> None:
            log.info("container OOM-killed a process", namespace=namespace, container=container_id)
            self._publish(namespace, "/tasks/oom", events_pb2.TaskOOM(container_id=container_id))

        return report

    def _exit_event(self, task: Task, exec_id: str, info: ExitInfo) -> api.Event:
        return api.Event(
            topic="exit",
            container_id=task.id,
            exec_id=exec_id,
            pid=info.pid,
            exit_status=info.exit_status,
            exited_at=info.exited_at,
        )

    def _on_close(self, task: Task) -> None:
        if task.client.closing or task.deleting or task.dead is not None:
            return
        self._spawn_background(self._shim_died(task), f"dead-shim-{task.namespace}/{task.id}")

    async def _shim_died(self, task: Task) -> None:
        logger = log.bind(namespace=task.namespace, container=task.id)
        logger.warning("shim died, cleaning up its task")
        await task.ready.wait()
        async with task.lifecycle(""):
            try:
                info = await task.shim.cleanup()
            except Exception as exc:
                logger.error("cleanup after a dead shim failed", error=str(exc))
                info = ExitInfo(pid=task.pid, exit_status=255, exited_at=time.time_ns())
            await self._settle_dead(task, info)

    async def _settle_dead(self, task: Task, info: ExitInfo) -> None:
        task.dead = info
        with contextlib.suppress(OSError):
            await asyncio.to_thread(bundles.write_json, task.bundle / bundles.DEAD_RECORD, info.to_wire())
        self._publish(
            task.namespace,
            "/tasks/exit",
            events_pb2.TaskExit(
                container_id=task.id,
                id=task.id,
                pid=info.pid,
                exit_status=info.exit_status,
                exited_at=timestamp(info.exited_at),
            ),
        )
        task.died.set()

    # -- create -------------------------------------------------------------------------------

    @shim_errors
    async def create(
        self,
        namespace: str,
        container_id: str,
        *,
        rootfs: Sequence[Mount],
        stdio: Stdio,
        options: Any = None,
        checkpoint: bool = False,
    ) -> Task:
        if checkpoint:
            raise NotImplementedYet("creating a task from a checkpoint is not supported by runtimed")
        container = await self.containers.get(namespace, container_id)
        key = (namespace, container_id)
        if key in self._tasks or key in self._creating:
            raise AlreadyExists(f"task {container_id}")
        runtime_name, runtime = self.runtimes.resolve(container.runtime.name)
        decoded = runtime.decode_options(options if options is not None else container.runtime.options)
        if container.spec is None or container.spec.type_url != SPEC_TYPE_URL:
            found = container.spec.type_url if container.spec else "none"
            raise InvalidArgument(f"container {q(container_id)}: spec must be {SPEC_TYPE_URL}, not {found}")
        try:
            spec = json.loads(container.spec.value)
        except ValueError as exc:
            raise InvalidArgument(f"container {q(container_id)}: spec is not JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise InvalidArgument(f"container {q(container_id)}: spec is not a JSON object")
        if rootfs:
            spec.setdefault("root", {})["path"] = bundles.ROOTFS
        socket_path = self.socket_path(namespace, container_id)
        bundle = self.state_dir / namespace / container_id
        logger = log.bind(namespace=namespace, container=container_id, runtime=runtime_name)

        self._creating.add(key)
        client: ShimClient | None = None
        try:
            if bundle.exists():  # debris of a task that did not end cleanly
                await bundles.remove(bundle)
            record = {
                "namespace": namespace,
                "id": container_id,
                "runtime": runtime_name,
                "options": decoded,
                "stdio": stdio.to_wire(),
                "rootfs": [m.__dict__ for m in rootfs],
                "created_at": time.time_ns(),
                "creating": True,  # until create succeeds: a crash before that is cleaned up
            }

            def prepare() -> None:
                bundles.make_directory(bundle)
                bundles.write_json(bundle / "config.json", spec)
                bundles.write_json(bundle / bundles.TASK_RECORD, record)

            await asyncio.to_thread(prepare)
            _, address = await self.launcher.spawn(
                {
                    "namespace": namespace,
                    "id": container_id,
                    "socket": socket_path,
                    "record": str(bundle / bundles.SHIM_RECORD),
                    "record_data": {"bundle": str(bundle)},
                    "log": str(bundle / "shim.log"),
                }
            )
            client = ShimClient(address, f"{namespace}/{container_id}")
            context = TaskContext(
                namespace,
                container_id,
                runtime_name,
                bundle,
                client,
                self._oom_reporter(namespace, container_id),
            )
            shim = runtime.new_task(context, decoded)
            task = Task(namespace, container_id, runtime_name, bundle, shim, client, stdio, list(rootfs))
            self._connect_handlers(task)
            await client.connect()
            task.ready.set()
            request = api.CreateRequest(
                bundle=str(bundle),
                rootfs=[api.Mount(m.type, m.source, m.target, list(m.options)) for m in rootfs],
                stdio=stdio,
                options=decoded,
            )
            task.pid = await shim.create(request)
            task.created_at = record["created_at"]
            record.update(creating=False, pid=task.pid)
            await asyncio.to_thread(bundles.write_json, bundle / bundles.TASK_RECORD, record)
        except BaseException as exc:
            logger.info("task create failed", error=str(exc))
            if client is not None:
                await client.shutdown(now=True)
                await client.close()
            with contextlib.suppress(Exception):
                await bundles.remove(bundle)
            raise
        finally:
            self._creating.discard(key)
        self._tasks[key] = task
        logger.info("task created", pid=task.pid)
        self._publish(
            namespace,
            "/tasks/create",
            events_pb2.TaskCreate(
                container_id=container_id,
                bundle=str(bundle),
                rootfs=[
                    mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=m.options)
                    for m in rootfs
                ],
                io=events_pb2.TaskIO(
                    stdin=stdio.stdin, stdout=stdio.stdout, stderr=stdio.stderr, terminal=stdio.terminal
                ),
                pid=task.pid,
            ),
        )
        return task

    # -- process life cycle -------------------------------------------------------------------

    def _alive(self, task: Task) -> None:
        if task.dead is not None:
            raise FailedPrecondition(f"task {task.id}: its shim died; the task is stopped")

    @shim_errors
    async def start(self, namespace: str, container_id: str, exec_id: str = "") -> int:
        task = self.get(namespace, container_id)
        self._alive(task)
        async with task.lifecycle(exec_id):
            pid = await task.shim.start(exec_id)
            if exec_id:
                self._publish(
                    namespace,
                    "/tasks/exec-started",
                    events_pb2.TaskExecStarted(container_id=container_id, exec_id=exec_id, pid=pid),
                )
            else:
                self._publish(
                    namespace, "/tasks/start", events_pb2.TaskStart(container_id=container_id, pid=pid)
                )
        return pid

    @shim_errors
    async def exec(self, namespace: str, container_id: str, exec_id: str, spec: Any, stdio: Stdio) -> None:
        identifiers.validate(exec_id, "exec id")
        task = self.get(namespace, container_id)
        self._alive(task)
        if spec is None or spec.type_url != PROCESS_TYPE_URL:
            raise InvalidArgument(f"exec {q(exec_id)}: spec must be {PROCESS_TYPE_URL}")
        try:
            process = json.loads(spec.value)
        except ValueError as exc:
            raise InvalidArgument(f"exec {q(exec_id)}: spec is not JSON: {exc}") from None
        if not isinstance(process, dict):
            raise InvalidArgument(f"exec {q(exec_id)}: spec is not a JSON object (a runtime-spec Process)")
        await task.shim.exec(api.ExecRequest(exec_id=exec_id, spec=process, stdio=stdio))
        self._publish(
            namespace,
            "/tasks/exec-added",
            events_pb2.TaskExecAdded(container_id=container_id, exec_id=exec_id),
        )

    @shim_errors
    async def state(self, namespace: str, container_id: str, exec_id: str = "") -> ProcessState:
        task = self.get(namespace, container_id)
        if task.dead is not None and not exec_id:  # the exit settled when its shim died
            return ProcessState(
                container_id=task.id,
                exec_id="",
                pid=task.dead.pid or task.pid,
                status=Status.STOPPED,
                stdin=task.stdio.stdin,
                stdout=task.stdio.stdout,
                stderr=task.stdio.stderr,
                terminal=task.stdio.terminal,
                exit_status=task.dead.exit_status,
                exited_at=task.dead.exited_at,
            )
        return await task.shim.state(exec_id)

    async def list(self, namespace: str) -> list[ProcessState]:
        states = []
        for task in self.tasks(namespace):
            with contextlib.suppress(RuntimedError, api.ShimError):
                states.append(await self.state(namespace, task.id))
        return states

    @shim_errors
    async def kill(self, namespace: str, container_id: str, exec_id: str, signal: int, all: bool) -> None:
        task = self.get(namespace, container_id)
        if task.dead is not None:
            raise NotFound("process already finished")
        await task.shim.kill(exec_id, signal or 15, all)

    @shim_errors
    async def wait(self, namespace: str, container_id: str, exec_id: str = "") -> ExitInfo:
        task = self.get(namespace, container_id)
        if task.dead is None:
            try:
                info = await task.shim.wait(exec_id)
                # The answer may come before the shim's exit event is handled: whoever asked
                # may call Get or Delete next, which must see the process stopped.
                async with task.lifecycle(exec_id):
                    self._report_exit(task, self._exit_event(task, exec_id, info))
                return info
            except Unavailable:
                if task.client.closing:
                    raise
            await task.died.wait()  # the shim died while we waited: its cleanup settles the status
        state = await self.state(namespace, container_id, exec_id)
        return ExitInfo(pid=state.pid, exit_status=state.exit_status, exited_at=state.exited_at)

    @shim_errors
    async def delete(self, namespace: str, container_id: str) -> ExitInfo:
        task = self.get(namespace, container_id)
        logger = log.bind(namespace=namespace, container=container_id)
        async with task.lifecycle(""):
            if task.deleting:
                raise FailedPrecondition(f"task {container_id} is being deleted")
            if task.dead is not None:
                info = task.dead
            else:
                state = await task.shim.state("")
                if state.status == Status.STOPPED:  # its exit is published before its delete
                    stopped = ExitInfo(
                        pid=state.pid, exit_status=state.exit_status, exited_at=state.exited_at
                    )
                    self._report_exit(task, self._exit_event(task, "", stopped))
                if state.status in (Status.RUNNING, Status.PAUSED, Status.PAUSING):
                    raise FailedPrecondition(
                        f"task {container_id} must be stopped before deletion: {state.status}"
                    )
                task.deleting = True
                try:
                    info = await task.shim.delete("")
                except BaseException:
                    task.deleting = False
                    raise
            task.deleting = True
            await task.client.shutdown()
            await task.client.close()
            await bundles.remove(task.bundle)
            self._tasks.pop((namespace, container_id), None)
        logger.info("task deleted", exit_status=info.exit_status)
        self._publish(
            namespace,
            "/tasks/delete",
            events_pb2.TaskDelete(
                container_id=container_id,
                pid=info.pid,
                exit_status=info.exit_status,
                exited_at=timestamp(info.exited_at),
            ),
        )
        return info

    @shim_errors
    async def delete_process(self, namespace: str, container_id: str, exec_id: str) -> ExitInfo:
        identifiers.validate(exec_id, "exec id")
        task = self.get(namespace, container_id)
        async with task.lifecycle(exec_id):
            state = await task.shim.state(exec_id)
            if state.status == Status.STOPPED:
                stopped = ExitInfo(pid=state.pid, exit_status=state.exit_status, exited_at=state.exited_at)
                self._report_exit(task, self._exit_event(task, exec_id, stopped))
            return await task.shim.delete(exec_id)

    @shim_errors
    async def pause(self, namespace: str, container_id: str) -> None:
        task = self.get(namespace, container_id)
        self._alive(task)
        await task.shim.pause()
        self._publish(namespace, "/tasks/paused", events_pb2.TaskPaused(container_id=container_id))

    @shim_errors
    async def resume(self, namespace: str, container_id: str) -> None:
        task = self.get(namespace, container_id)
        self._alive(task)
        await task.shim.resume()
        self._publish(namespace, "/tasks/resumed", events_pb2.TaskResumed(container_id=container_id))

    @shim_errors
    async def pids(self, namespace: str, container_id: str) -> list[ProcessInfo]:
        task = self.get(namespace, container_id)
        self._alive(task)
        return await task.shim.pids()

    @shim_errors
    async def update(
        self, namespace: str, container_id: str, resources: Any, annotations: dict[str, str]
    ) -> None:
        task = self.get(namespace, container_id)
        self._alive(task)
        document: dict[str, Any] = {}
        if resources is not None:
            if resources.type_url != RESOURCES_TYPE_URL:
                raise InvalidArgument(f"task {container_id}: resources must be {RESOURCES_TYPE_URL}")
            try:
                document = json.loads(resources.value or b"{}")
            except ValueError as exc:
                raise InvalidArgument(f"task {container_id}: resources are not JSON: {exc}") from None
        await task.shim.update(document, annotations)

    @shim_errors
    async def close_io(self, namespace: str, container_id: str, exec_id: str) -> None:
        task = self.get(namespace, container_id)
        self._alive(task)
        await task.shim.close_io(exec_id)

    @shim_errors
    async def resize_pty(
        self, namespace: str, container_id: str, exec_id: str, width: int, height: int
    ) -> None:
        task = self.get(namespace, container_id)
        self._alive(task)
        await task.shim.resize_pty(exec_id, width, height)

    async def metrics(self, namespace: str, filter_exprs: Sequence[str]) -> list[tuple[Task, Stats]]:
        matcher = filters.parse_all(filter_exprs)
        found = []
        for task in self.tasks(namespace):
            adaptor = filters.adaptor_for(
                {"id": task.id, "namespace": task.namespace, "runtime": task.runtime}
            )
            if not matcher.match(adaptor) or task.dead is not None:
                continue
            with contextlib.suppress(RuntimedError, api.ShimError):
                found.append((task, await task.shim.stats()))
        return found

    # -- start-up and shutdown ----------------------------------------------------------------

    async def load(self) -> None:
        """Re-adopt every task a previous daemon left (see the module docstring)."""
        namespaces = [ns for ns in sorted(self.state_dir.iterdir()) if ns.is_dir()]
        directories = [d for ns in namespaces for d in sorted(ns.iterdir())]
        limit = asyncio.Semaphore(LOAD_CONCURRENCY)

        async def load_one(directory: Path) -> None:
            async with limit:
                try:
                    await asyncio.wait_for(self._load(directory), LOAD_TIMEOUT)
                except Exception as exc:
                    log.error(
                        "cannot re-adopt task", bundle=str(directory), error=str(exc) or type(exc).__name__
                    )

        await asyncio.gather(*(load_one(d) for d in directories))
        if directories:
            log.info("tasks re-adopted", tasks=len(self._tasks), directories=len(directories))

    async def _load(self, bundle: Path) -> None:
        namespace, container_id = bundle.parent.name, bundle.name
        logger = log.bind(namespace=namespace, container=container_id)
        try:
            record = await asyncio.to_thread(bundles.read_json, bundle / bundles.TASK_RECORD)
        except (OSError, ValueError):
            record = None
        shim_record: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            shim_record = await asyncio.to_thread(bundles.read_json, bundle / bundles.SHIM_RECORD)
        address = shim_record.get("address") or self.socket_path(namespace, container_id)
        client = ShimClient(address, f"{namespace}/{container_id}")
        if record is None:  # debris: stop whatever shim it has, remove it
            logger.info("removing an unfinished task directory")
            with contextlib.suppress(RuntimedError):
                await client.connect()
                await client.shutdown(now=True)
            await client.close()
            await bundles.remove(bundle)
            return
        runtime_name, runtime = self.runtimes.resolve(record["runtime"])
        stdio = Stdio.from_wire(record.get("stdio") or {})
        context = TaskContext(
            namespace, container_id, runtime_name, bundle, client, self._oom_reporter(namespace, container_id)
        )
        shim = runtime.new_task(context, record.get("options") or {})
        task = Task(
            namespace,
            container_id,
            runtime_name,
            bundle,
            shim,
            client,
            stdio,
            [Mount(**m) for m in record.get("rootfs") or []],
            pid=int(record.get("pid") or 0),
            created_at=int(record.get("created_at") or 0),
        )
        if record.get("creating"):  # the daemon died during create: undo it
            logger.info("cleaning up a task whose create never finished")
            with contextlib.suppress(RuntimedError):
                await client.connect()
                await client.shutdown(now=True)
            await client.close()
            with contextlib.suppress(RuntimedError, api.ShimError):
                await shim.cleanup()
            await bundles.remove(bundle)
            return
        dead = None
        with contextlib.suppress(OSError, ValueError):
            dead = ExitInfo.from_wire(
                await asyncio.to_thread(bundles.read_json, bundle / bundles.DEAD_RECORD)
            )
        self._connect_handlers(task)
        if dead is None:
            try:
                info = await client.connect()
                await shim.restore(info.processes)
                task.ready.set()
                self._tasks[(namespace, container_id)] = task
                logger.info("task re-adopted", shim_pid=info.pid, processes=len(info.processes))
                return
            except (RuntimedError, api.ShimError) as exc:
                logger.warning("shim of task is gone", error=str(exc))
                await client.close()
        task.ready.set()
        self._tasks[(namespace, container_id)] = task
        if dead is not None:
            await shim.cleanup()  # idempotent: make sure nothing is left running or mounted
            task.dead = dead
            task.died.set()
            return
        async with task.lifecycle(""):
            try:
                settled = await shim.cleanup()
            except Exception as exc:
                logger.error("cleanup of a dead shim's task failed", error=str(exc))
                settled = ExitInfo(pid=task.pid, exit_status=255, exited_at=time.time_ns())
            await self._settle_dead(task, settled)

    async def close(self) -> None:
        """Daemon shutdown: disconnect from every shim (they carry on), stop the zygote."""
        for task in list(self._tasks.values()):
            await task.client.close()
        for background in list(self._background):
            background.cancel()
        await self.launcher.close()


def check_socket_dir(socket_dir: Path) -> None:
    longest = len(str(socket_dir)) + 1 + 32 + len(".sock")
    if longest > MAX_SOCKET_PATH:
        raise Internal(
            f"shim socket directory {socket_dir} is too long for unix socket paths "
            f"({longest} > {MAX_SOCKET_PATH} bytes): use a shorter --state"
        )


# -- the plugin ----------------------------------------------------------------------------------

TASK_MANAGER_TYPE = "io.containerd.runtime.v2"  # containerd's type and id: `ctr plugins ls` shows it


async def init(ctx: InitContext) -> TaskManager:
    metadata = ctx.plugins.get_single(PluginType.METADATA)
    events = ctx.plugins.get_single(PluginType.EVENT)
    ctx.ensure_dirs()
    socket_dir = ctx.daemon_state / "s"
    check_socket_dir(socket_dir)
    socket_dir.mkdir(mode=0o700, exist_ok=True)
    runtimes = Runtimes(ctx.plugins, str(ctx.config["default_runtime"]))
    manager = TaskManager(
        state=ctx.state,
        socket_dir=socket_dir,
        containers=metadata.containers,
        events=events,
        runtimes=runtimes,
        launcher=ShimLauncher(),
    )
    await manager.load()
    # Where detached processes may log (runtimectl run -d writes file://<log_dir>/<ns>/<id>.log).
    log_dir = ctx.root / "logs"
    log_dir.mkdir(mode=0o700, exist_ok=True)
    ctx.exports.update(default_runtime=runtimes.default, state=str(ctx.state), log_dir=str(log_dir))
    return manager


PLUGINS = [
    Registration(
        type=TASK_MANAGER_TYPE,
        id="task",
        init=init,
        # After every other plugin: runtime backends (third-party ones from entry points too)
        # must be there before tasks are re-adopted.
        requires=(ALL,),
        config={"default_runtime": "io.containerd.runc.v2"},
    )
]
