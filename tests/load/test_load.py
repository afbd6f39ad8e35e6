"""Load: 200 concurrent API clients, each on its own gRPC channel, against one daemon.

    .venv/bin/python -m pytest tests/load -s            # prints p50/p99 per method
    RUNTIMED_LOAD_WRITE=1 .venv/bin/python -m pytest tests/load -s   # also bench/results/load.json

Most clients make cheap metadata calls (container create/get/delete on a small shared pool of ids,
so ALREADY_EXISTS and NOT_FOUND races happen on purpose, lists, leases, version); a few dozen run
whole task lifecycles with runc (snapshot, container, task create/start, exec, a deliberately
premature delete (FAILED_PRECONDITION), kill, wait, delete). After a warm-up round the daemon's
fd count and RSS are the baseline; after the main round they must come back near it, and nothing
may be left: no shim, no container process, no mount, no cgroup, no bundle.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import statistics
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from fixtures.tasks import (
    RUNC,
    SNAPSHOTTER,
    TASK_STATE,
    TaskRig,
    cgroups_of,
    mounts_under,
    reap_leftovers,
    shim_processes,
    unique_namespace,
)
from google.protobuf import any_pb2, empty_pb2

from runtimed.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from runtimed.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from runtimed.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from runtimed.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from runtimed.api.containerd.services.namespaces.v1 import namespace_pb2, namespace_pb2_grpc
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from runtimed.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from runtimed.api.containerd.services.version.v1 import version_pb2_grpc
from runtimed.wire import NAMESPACE_KEY

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, mounts)"),
    pytest.mark.timeout(240),
]

CLIENTS = 200
TASK_CLIENTS = 24  # of the 200: whole runc lifecycles (2 cores must keep up)
WARMUP_SECONDS = 5.0
RUN_SECONDS = 25.0
CALL_TIMEOUT = 30.0  # a call not done by then is a deadlock for this test
POOL = [f"pool-{i}" for i in range(12)]  # shared container ids: create/delete races on purpose
FD_TOLERANCE = 8
RSS_GROWTH_LIMIT = 40 * 1024 * 1024
SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "load.json"

NF, AE, FP = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION


class Recorder:
    """Latencies per method, expected (provoked) errors, and anything unexpected."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.expected: Counter[tuple[str, str]] = Counter()
        self.unexpected: list[str] = []
        self.init_pids: set[int] = set()

    def call(self, method: str, fn: Callable[..., Any], *args: Any, expect: tuple = (), **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            result = fn(*args, timeout=CALL_TIMEOUT, **kwargs)
        except grpc.RpcError as exc:
            elapsed = time.perf_counter() - started
            with self.lock:
                self.latency[method].append(elapsed)
                if exc.code() in expect:
                    self.expected[method, exc.code().name] += 1
                else:
                    self.unexpected.append(f"{method}: {exc.code().name}: {exc.details()}")
            return None
        elapsed = time.perf_counter() - started
        with self.lock:
            self.latency[method].append(elapsed)
        return result

    def summary(self) -> dict[str, dict[str, float]]:
        rows = {}
        for method, values in sorted(self.latency.items()):
            ordered = sorted(values)
            rows[method] = {
                "calls": len(ordered),
                "p50_ms": round(statistics.median(ordered) * 1000, 1),
                "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 1),
                "max_ms": round(ordered[-1] * 1000, 1),
            }
        return rows


def metadata_client(address: str, namespace: str, seed: int, until: float, rec: Recorder) -> None:
    rng = random.Random(seed)
    channel = grpc.insecure_channel(f"unix://{address}")
    md = [(NAMESPACE_KEY, namespace)]
    containers = containers_pb2_grpc.ContainersStub(channel)
    images = images_pb2_grpc.ImagesStub(channel)
    leases = leases_pb2_grpc.LeasesStub(channel)
    content = content_pb2_grpc.ContentStub(channel)
    namespaces = namespace_pb2_grpc.NamespacesStub(channel)
    snapshots = snapshots_pb2_grpc.SnapshotsStub(channel)
    tasks = tasks_pb2_grpc.TasksStub(channel)
    version = version_pb2_grpc.VersionStub(channel)
    spec = any_pb2.Any(type_url=SPEC_URL, value=b'{"ociVersion":"1.0.2"}')
    try:
        while time.monotonic() < until:
            op = rng.randrange(10)
            cid = rng.choice(POOL)
            if op == 0:
                container = containers_pb2.Container(
                    id=cid,
                    runtime=containers_pb2.Container.Runtime(name=RUNC),
                    spec=spec,
                    labels={"c": str(seed)},
                )
                rec.call(
                    "Containers.Create",
                    containers.Create,
                    containers_pb2.CreateContainerRequest(container=container),
                    metadata=md,
                    expect=(AE,),
                )
            elif op == 1:
                rec.call(
                    "Containers.Delete",
                    containers.Delete,
                    containers_pb2.DeleteContainerRequest(id=cid),
                    metadata=md,
                    expect=(NF,),
                )
            elif op == 2:
                rec.call(
                    "Containers.Get",
                    containers.Get,
                    containers_pb2.GetContainerRequest(id=cid),
                    metadata=md,
                    expect=(NF,),
                )
            elif op == 3:
                rec.call(
                    "Containers.List",
                    containers.List,
                    containers_pb2.ListContainersRequest(filters=["labels.c~=^[0-9]+$"]),
                    metadata=md,
                )
            elif op == 4:
                rec.call("Images.List", images.List, images_pb2.ListImagesRequest(), metadata=md)
            elif op == 5:
                lease = rec.call("Leases.Create", leases.Create, leases_pb2.CreateRequest(), metadata=md)
                if lease is not None:
                    rec.call(
                        "Leases.Delete",
                        leases.Delete,
                        leases_pb2.DeleteRequest(id=lease.lease.id),
                        metadata=md,
                    )
            elif op == 6:
                rec.call(
                    "Content.ListStatuses",
                    content.ListStatuses,
                    content_pb2.ListStatusesRequest(),
                    metadata=md,
                )
            elif op == 7:
                rec.call("Tasks.List", tasks.List, tasks_pb2.ListTasksRequest(), metadata=md)
            elif op == 8:
                rec.call("Namespaces.List", namespaces.List, namespace_pb2.ListNamespacesRequest())
                rec.call(
                    "Snapshots.Stat",
                    snapshots.Stat,
                    snapshots_pb2.StatSnapshotRequest(snapshotter=SNAPSHOTTER, key="busybox-base"),
                    metadata=md,
                )
            else:
                rec.call("Version", version.Version, empty_pb2.Empty())
            time.sleep(rng.uniform(0, 0.02))  # think time
    finally:
        channel.close()


def task_client(address: str, namespace: str, worker: int, until: float, rec: Recorder, tmp: Path) -> None:
    rig = TaskRig(address, namespace, tmp)
    rig._has_base = True  # made once by the test before the clients start
    tasks = rig.tasks
    md = rig.md
    n = 0
    try:
        while time.monotonic() < until:
            cid = f"w{worker}-{n}"
            n += 1
            started = time.perf_counter()
            try:
                rig.container(cid, ["sleep", "60"])
            except grpc.RpcError as exc:
                rec.unexpected.append(f"container setup {cid}: {exc.code().name}: {exc.details()}")
                continue
            rec.latency["Snapshots.Prepare+Containers.Create"].append(time.perf_counter() - started)
            create = tasks_pb2.CreateTaskRequest(container_id=cid, rootfs=rig.mounts(cid))
            created = rec.call("Tasks.Create", tasks.Create, create, metadata=md)
            if created is not None:
                with rec.lock:
                    rec.init_pids.add(created.pid)
                rec.call("Tasks.Start", tasks.Start, tasks_pb2.StartRequest(container_id=cid), metadata=md)
                # Provoked: deleting a running task is refused.
                rec.call(
                    "Tasks.Delete(running)",
                    tasks.Delete,
                    tasks_pb2.DeleteTaskRequest(container_id=cid),
                    metadata=md,
                    expect=(FP,),
                )
                # Someone else's task, maybe already gone.
                other = f"w{(worker + 1) % TASK_CLIENTS}-{max(n - 2, 0)}"
                rec.call(
                    "Tasks.Get(other)",
                    tasks.Get,
                    tasks_pb2.GetRequest(container_id=other),
                    metadata=md,
                    expect=(NF,),
                )
                if n % 2 == 0:
                    process = {
                        "args": ["true"],
                        "cwd": "/",
                        "env": ["PATH=/bin"],
                        "user": {"uid": 0, "gid": 0},
                    }
                    exec_request = tasks_pb2.ExecProcessRequest(
                        container_id=cid,
                        exec_id="e1",
                        spec=any_pb2.Any(
                            type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                            value=json.dumps(process).encode(),
                        ),
                    )
                    if rec.call("Tasks.Exec", tasks.Exec, exec_request, metadata=md) is not None:
                        rec.call(
                            "Tasks.Start(exec)",
                            tasks.Start,
                            tasks_pb2.StartRequest(container_id=cid, exec_id="e1"),
                            metadata=md,
                        )
                        rec.call(
                            "Tasks.Wait(exec)",
                            tasks.Wait,
                            tasks_pb2.WaitRequest(container_id=cid, exec_id="e1"),
                            metadata=md,
                        )
                        rec.call(
                            "Tasks.DeleteProcess",
                            tasks.DeleteProcess,
                            tasks_pb2.DeleteProcessRequest(container_id=cid, exec_id="e1"),
                            metadata=md,
                        )
                rec.call(
                    "Tasks.Kill",
                    tasks.Kill,
                    tasks_pb2.KillRequest(container_id=cid, signal=signal.SIGKILL),
                    metadata=md,
                )
                rec.call("Tasks.Wait", tasks.Wait, tasks_pb2.WaitRequest(container_id=cid), metadata=md)
                rec.call(
                    "Tasks.Delete", tasks.Delete, tasks_pb2.DeleteTaskRequest(container_id=cid), metadata=md
                )
            rec.call(
                "Containers.Delete(task)",
                rig.containers.Delete,
                containers_pb2.DeleteContainerRequest(id=cid),
                metadata=md,
            )
            rec.call(
                "Snapshots.Remove",
                rig.snapshots.Remove,
                snapshots_pb2.RemoveSnapshotRequest(snapshotter=SNAPSHOTTER, key=cid),
                metadata=md,
            )
    finally:
        rig.close()


def run_round(address: str, namespace: str, seconds: float, tmp: Path) -> Recorder:
    rec = Recorder()
    until = time.monotonic() + seconds
    threads = []
    for i in range(CLIENTS):
        if i < TASK_CLIENTS:
            fifo_dir = tmp / f"w{i}"
            fifo_dir.mkdir(exist_ok=True)
            target, args = task_client, (address, namespace, i, until, rec, fifo_dir)
        else:
            target, args = metadata_client, (address, namespace, i, until, rec)
        threads.append(threading.Thread(target=target, args=args, daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        # Every call has a 30 s deadline; a client still running long after the round is stuck.
        thread.join(timeout=seconds + 4 * CALL_TIMEOUT)
        assert not thread.is_alive(), "a client did not finish: deadlock"
    return rec


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def settle_fds(pid: int, baseline: int, seconds: float = 15.0) -> int:
    """The daemon's fd count once closed connections are reaped (polls up to `seconds`)."""
    deadline = time.monotonic() + seconds
    count = fd_count(pid)
    while count > baseline + FD_TOLERANCE and time.monotonic() < deadline:
        time.sleep(0.25)
        count = fd_count(pid)
    return count


def pool_cleanup(address: str, namespace: str) -> None:
    with grpc.insecure_channel(f"unix://{address}") as channel:
        containers = containers_pb2_grpc.ContainersStub(channel)
        for cid in POOL:
            with contextlib.suppress(grpc.RpcError):
                containers.Delete(
                    containers_pb2.DeleteContainerRequest(id=cid), metadata=[(NAMESPACE_KEY, namespace)]
                )


def test_200_clients(daemon_factory, tmp_path):
    # Info-level logs: at debug, the log file would be most of what the daemon does.
    daemon = daemon_factory(extra_args=["--log-level", "info"]).start()
    pid = daemon.process.pid
    namespace = unique_namespace("load")
    setup = TaskRig(daemon.address, namespace, tmp_path)
    try:
        setup.base_snapshot()

        warm = run_round(daemon.address, namespace, WARMUP_SECONDS, tmp_path)
        assert not warm.unexpected, warm.unexpected[:10]
        pool_cleanup(daemon.address, namespace)
        time.sleep(1.0)
        fds_before, rss_before = settle_fds(pid, 0, 3.0), rss(pid)

        started = time.monotonic()
        rec = run_round(daemon.address, namespace, RUN_SECONDS, tmp_path)
        elapsed = time.monotonic() - started
        pool_cleanup(daemon.address, namespace)
        fds_after = settle_fds(pid, fds_before)
        rss_after = rss(pid)

        summary = rec.summary()
        total = sum(row["calls"] for row in summary.values())
        report = {
            "clients": CLIENTS,
            "task_clients": TASK_CLIENTS,
            "seconds": round(elapsed, 1),
            "calls": total,
            "calls_per_second": round(total / elapsed, 1),
            "task_lifecycles": len(rec.init_pids),
            "expected_errors": {f"{m} {c}": n for (m, c), n in sorted(rec.expected.items())},
            "unexpected_errors": len(rec.unexpected),
            "daemon_fds": {"before": fds_before, "after": fds_after},
            "daemon_rss_mib": {"before": round(rss_before / 2**20, 1), "after": round(rss_after / 2**20, 1)},
            "methods": summary,
        }
        print(
            f"\n{CLIENTS} clients ({TASK_CLIENTS} running tasks), {elapsed:.1f}s, {total} calls "
            f"({total / elapsed:.0f}/s), {len(rec.init_pids)} task lifecycles"
        )
        print(f"{'method':38} {'calls':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for method, row in summary.items():
            print(f"{method:38} {row['calls']:7} {row['p50_ms']:8} {row['p99_ms']:8} {row['max_ms']:8}")
        print(f"provoked errors: {report['expected_errors']}")
        mib_before, mib_after = rss_before / 2**20, rss_after / 2**20
        print(f"daemon fds {fds_before} -> {fds_after}, RSS {mib_before:.1f} -> {mib_after:.1f} MiB")
        (tmp_path / "load.json").write_text(json.dumps(report, indent=2))
        if os.environ.get("RUNTIMED_LOAD_WRITE"):
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(report, indent=2) + "\n")

        assert not rec.unexpected, f"{len(rec.unexpected)} unexpected errors: {rec.unexpected[:10]}"
        assert rec.init_pids, "no task ran"
        assert rec.expected, "no race was provoked"
        assert fds_after <= fds_before + FD_TOLERANCE, (fds_before, fds_after)
        assert rss_after - rss_before <= RSS_GROWTH_LIMIT, (rss_before, rss_after)

        # Nothing left: the daemon reports no task, no shim runs, no container process lives.
        with grpc.insecure_channel(f"unix://{daemon.address}") as channel:
            listed = tasks_pb2_grpc.TasksStub(channel).List(
                tasks_pb2.ListTasksRequest(), metadata=[(NAMESPACE_KEY, namespace)], timeout=30
            )
            assert not listed.tasks
        assert not shim_processes(daemon.state)
        alive = [p for p in rec.init_pids | warm.init_pids if _alive(p)]
        assert not alive, f"container processes still alive: {alive}"
        assert not mounts_under(daemon.state / TASK_STATE)
        assert not list((daemon.state / TASK_STATE).glob(f"{namespace}/*"))
        for cgroup in cgroups_of(namespace):
            assert not [d for d in os.scandir(cgroup) if d.is_dir()], cgroup
        assert daemon.process.poll() is None
    finally:
        setup.close()
        leftovers = reap_leftovers(daemon.state, [namespace])
    assert not leftovers, f"test left {leftovers}"


def _alive(pid: int) -> bool:
    """Whether pid is a live (non-zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
