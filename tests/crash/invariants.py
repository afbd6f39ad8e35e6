"""What must hold of a daemon's store after any crash or fault: one reusable checker.

    problems = check_store(daemon, running=[RunningTask(ns, "c1", pid)], trees={chain_id: {...}})
    assert not problems, "\\n".join(problems)
    cleanup(daemon)                                   # kill/delete tasks, containers, images, leases; GC
    assert not leaks(daemon, namespaces)              # mounts, shims, cgroups, ingests, temp files

check_store() asks the running daemon (gRPC) and looks at its root (files, the snapshotters'
SQLite files, read-only) and returns every violation found, as text, rather than stopping at the
first one:

* the store opens: the daemon answers Version;
* content: every listed blob's file exists, has the listed size and hashes to its digest; every
  file under blobs/ hashes to its name (nothing half-written was renamed into place); no blob
  file lacks a record once the start-up collection has run (``orphans_ok`` relaxes this);
  ingests never appear as content;
* snapshots: the snapshotter's rows and its snapshots/<id> directories match one to one, with no
  staging or trash directory left after the start-up cleanup; every committed snapshot has its
  fs directory and its parent; a snapshot named in ``trees`` (a layer's chainID -> the relative
  paths its layer holds) has exactly those files (a committed layer is never half-applied);
* images: the manifest, config and every layer are content of the namespace, and the top
  chainID snapshot is committed (the record is written only after the unpack);
* containers: each one's snapshot exists in its snapshotter;
* tasks: each ``running`` task is RUNNING with the same pid and an exec in it exits 0; every
  listed task answers Get, and a RUNNING one's pid is alive.

leaks() runs after cleanup(): no mount under the daemon's root or state (/proc/self/mountinfo), no
live shim among the pids recorded in the state directory, no cgroup of the given namespaces, no
ingest, no staging/trash snapshot directory, no temporary file (write_atomic's ``.name.tmp-pid``)
under the root, and blob files == content records.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from fixtures.tasks import PROCESS_URL, RUNC, TASK_STATE, cgroups_of, mounts_under, shim_processes
from google.protobuf import any_pb2, empty_pb2

from runtimed.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from runtimed.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from runtimed.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from runtimed.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from runtimed.api.containerd.services.namespaces.v1 import namespace_pb2, namespace_pb2_grpc
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from runtimed.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from runtimed.api.containerd.services.version.v1 import version_pb2_grpc
from runtimed.api.containerd.types.task import task_pb2
from runtimed.api.runtimed.services.transfer.v1 import transfer_pb2, transfer_pb2_grpc
from runtimed.images.manifest import chain_ids
from runtimed.tasks import spec as specs
from runtimed.wire import LEASE_KEY, NAMESPACE_KEY

CONTENT_ROOT = "io.containerd.content.v1.content"
SNAPSHOTTERS = ("overlayfs", "native")
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


@dataclass(frozen=True)
class RunningTask:
    namespace: str
    container_id: str
    pid: int


class Stubs:
    """Every stub the checks need, on one channel."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.version = version_pb2_grpc.VersionStub(self.channel)
        self.namespaces = namespace_pb2_grpc.NamespacesStub(self.channel)
        self.content = content_pb2_grpc.ContentStub(self.channel)
        self.snapshots = snapshots_pb2_grpc.SnapshotsStub(self.channel)
        self.images = images_pb2_grpc.ImagesStub(self.channel)
        self.containers = containers_pb2_grpc.ContainersStub(self.channel)
        self.tasks = tasks_pb2_grpc.TasksStub(self.channel)
        self.leases = leases_pb2_grpc.LeasesStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def namespace_names(self) -> list[str]:
        listing = self.namespaces.List(namespace_pb2.ListNamespacesRequest(), timeout=30)
        return sorted(n.name for n in listing.namespaces)


def md(namespace: str, lease: str = "") -> list[tuple[str, str]]:
    return [(NAMESPACE_KEY, namespace), (LEASE_KEY, lease)] if lease else [(NAMESPACE_KEY, namespace)]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def blob_dir(daemon: Any) -> Path:
    return daemon.root / CONTENT_ROOT / "blobs" / "sha256"


def ingest_dir(daemon: Any) -> Path:
    return daemon.root / CONTENT_ROOT / "ingest"


def snapshotter_root(daemon: Any, name: str) -> Path:
    return daemon.root / f"io.containerd.snapshotter.v1.{name}"


def snapshot_rows(daemon: Any, name: str) -> list[dict[str, Any]]:
    """The snapshotter's rows, read-only (WAL: a reader never disturbs the daemon)."""
    path = snapshotter_root(daemon, name) / "metadata.db"
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return [
            dict(row) for row in conn.execute("SELECT id, namespace, name, parent_id, kind FROM snapshots")
        ]
    finally:
        conn.close()


def tree(directory: Path) -> set[str]:
    """Relative paths of everything under directory (directories with a trailing /)."""
    found = set()
    for parent, dirs, files in os.walk(directory):
        rel = os.path.relpath(parent, directory)
        for name in dirs:
            found.add(os.path.normpath(os.path.join(rel, name)) + "/")
        for name in files:
            found.add(os.path.normpath(os.path.join(rel, name)))
    return found


def layer_tree(layer_tar: bytes) -> set[str]:
    """What tree() finds in an overlayfs layer's fs directory after applying layer_tar."""
    import io
    import tarfile

    found = set()
    with tarfile.open(fileobj=io.BytesIO(layer_tar)) as tar:
        for member in tar.getmembers():
            name = member.name.rstrip("/")
            found.add(name + "/" if member.isdir() else name)
    return found


def check_store(
    daemon: Any,
    *,
    running: Sequence[RunningTask] = (),
    trees: Mapping[str, set[str]] | None = None,
    orphans_ok: bool = False,
    snapshotters: Sequence[str] = SNAPSHOTTERS,
) -> list[str]:
    """Every invariant violation found in the daemon's store (an empty list: all good)."""
    problems: list[str] = []
    stubs = Stubs(daemon.address)
    try:
        try:
            stubs.version.Version(empty_pb2.Empty(), timeout=30)
        except grpc.RpcError as exc:
            return [f"the store does not open: Version: {exc.code().name} {exc.details()}"]
        namespaces = stubs.namespace_names()
        problems += _check_content(daemon, stubs, namespaces, orphans_ok)
        committed = {}
        for name in snapshotters:
            found, names = _check_snapshots(daemon, stubs, name, namespaces, trees or {})
            problems += found
            committed[name] = names
        problems += _check_images(stubs, namespaces, committed)
        problems += _check_containers(stubs, namespaces)
        problems += _check_tasks(stubs, namespaces, running)
    finally:
        stubs.close()
    return problems


def _check_content(daemon: Any, stubs: Stubs, namespaces: Iterable[str], orphans_ok: bool) -> list[str]:
    problems = []
    recorded: set[str] = set()
    for namespace in namespaces:
        infos = [
            i
            for r in stubs.content.List(content_pb2.ListContentRequest(), metadata=md(namespace), timeout=30)
            for i in r.info
        ]
        for info in infos:
            recorded.add(info.digest)
            path = blob_dir(daemon) / info.digest.split(":", 1)[1]
            if not path.is_file():
                problems.append(f"content {namespace}/{info.digest}: listed but its blob file is missing")
                continue
            if path.stat().st_size != info.size:
                problems.append(
                    f"content {namespace}/{info.digest}: {path.stat().st_size} bytes, listed {info.size}"
                )
        statuses = stubs.content.ListStatuses(content_pb2.ListStatusesRequest(), metadata=md(namespace))
        listed = {i.digest for i in infos}
        for status in statuses.statuses:
            if status.ref in listed:
                problems.append(f"ingest {namespace}/{status.ref} is listed as content")
            if status.total and status.offset > status.total:
                problems.append(
                    f"ingest {namespace}/{status.ref}: offset {status.offset} > total {status.total}"
                )
    directory = blob_dir(daemon)
    files = set(os.listdir(directory)) if directory.exists() else set()
    for name in sorted(files):
        actual = sha256_file(directory / name)
        if actual != "sha256:" + name:
            problems.append(f"blob file {name} holds {actual}: a half-written blob was renamed into place")
    if not orphans_ok:
        orphans = {"sha256:" + f for f in files} - recorded
        if orphans:
            problems.append(f"blob files without a record after the start-up collection: {sorted(orphans)}")
    return problems


def _check_snapshots(
    daemon: Any, stubs: Stubs, snapshotter: str, namespaces: Iterable[str], trees: Mapping[str, set[str]]
) -> tuple[list[str], dict[str, set[str]]]:
    problems: list[str] = []
    root = snapshotter_root(daemon, snapshotter)
    committed: dict[str, set[str]] = {}
    if not root.exists():
        return problems, committed
    rows = snapshot_rows(daemon, snapshotter)
    by_id = {row["id"]: row for row in rows}
    entries = set(os.listdir(root / "snapshots")) if (root / "snapshots").exists() else set()
    ids = {str(i) for i in by_id}
    for missing in sorted(ids - entries):
        row = by_id[int(missing)]
        problems.append(f"{snapshotter} snapshot {row['namespace']}/{row['name']}: no directory {missing}")
    for extra in sorted(entries - ids):
        problems.append(
            f"{snapshotter}: snapshots/{extra} names no snapshot (left after the start-up cleanup)"
        )
    for namespace in namespaces:
        request = snapshots_pb2.ListSnapshotsRequest(snapshotter=snapshotter)
        try:
            infos = [
                i for r in stubs.snapshots.List(request, metadata=md(namespace), timeout=30) for i in r.info
            ]
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # snapshotter not loaded on this host
                return problems, committed
            raise
        in_db = {row["name"]: row for row in rows if row["namespace"] == namespace}
        if {i.name for i in infos} != set(in_db):
            problems.append(
                f"{snapshotter} {namespace}: listed {sorted(i.name for i in infos)} != rows {sorted(in_db)}"
            )
        names = committed.setdefault(namespace, set())
        for info in infos:
            row = in_db.get(info.name)
            if row is None:
                continue
            if info.parent and info.parent not in in_db:
                problems.append(f"{snapshotter} {namespace}/{info.name}: parent {info.parent} is missing")
            if info.kind != snapshots_pb2.COMMITTED:
                continue
            names.add(info.name)
            fs = root / "snapshots" / str(row["id"]) / "fs"
            if not fs.is_dir():
                problems.append(f"{snapshotter} {namespace}/{info.name}: committed without its fs directory")
            elif info.name in trees and snapshotter == "overlayfs":
                found = tree(fs)
                if found != trees[info.name]:
                    missing = sorted(trees[info.name] - found)[:5]
                    extra = sorted(found - trees[info.name])[:5]
                    problems.append(
                        f"{snapshotter} {namespace}/{info.name}: committed but half-applied "
                        f"({len(found)} of {len(trees[info.name])} entries; missing {missing}, extra {extra})"
                    )
    return problems, committed


def _read_blob(stubs: Stubs, namespace: str, digest: str) -> bytes:
    request = content_pb2.ReadContentRequest(digest=digest)
    return b"".join(r.data for r in stubs.content.Read(request, metadata=md(namespace), timeout=30))


def _check_images(
    stubs: Stubs, namespaces: Iterable[str], committed: Mapping[str, Mapping[str, set[str]]]
) -> list[str]:
    problems = []
    for namespace in namespaces:
        images = stubs.images.List(images_pb2.ListImagesRequest(), metadata=md(namespace), timeout=30).images
        for image in images:
            what = f"image {namespace}/{image.name}"
            try:
                manifests = [image.target]
                if image.target.media_type in INDEX_TYPES:
                    index = json.loads(_read_blob(stubs, namespace, image.target.digest))
                    manifests = []
                    for child in index["manifests"]:
                        try:
                            stubs.content.Info(
                                content_pb2.InfoRequest(digest=child["digest"]), metadata=md(namespace)
                            )
                        except grpc.RpcError:
                            continue  # another platform's, not fetched
                        manifests.append(type("D", (), {"digest": child["digest"]}))
                    if not manifests:
                        problems.append(f"{what}: no manifest of its index is in the store")
                for desc in manifests:
                    manifest = json.loads(_read_blob(stubs, namespace, desc.digest))
                    config = json.loads(_read_blob(stubs, namespace, manifest["config"]["digest"]))
                    for layer in manifest["layers"]:
                        info = stubs.content.Info(
                            content_pb2.InfoRequest(digest=layer["digest"]), metadata=md(namespace)
                        )
                        if info.info.size != layer["size"]:
                            problems.append(f"{what}: layer {layer['digest']} has size {info.info.size}")
                    chains = chain_ids(config["rootfs"]["diff_ids"])
                    if chains and not any(
                        chains[-1] in names.get(namespace, set()) for names in committed.values()
                    ):
                        problems.append(f"{what}: its top snapshot {chains[-1]} is not committed")
            except grpc.RpcError as exc:
                problems.append(f"{what}: content incomplete: {exc.code().name} {exc.details()}")
    return problems


def _check_containers(stubs: Stubs, namespaces: Iterable[str]) -> list[str]:
    problems = []
    for namespace in namespaces:
        listing = stubs.containers.List(
            containers_pb2.ListContainersRequest(), metadata=md(namespace), timeout=30
        )
        for container in listing.containers:
            if not container.snapshot_key:
                continue
            request = snapshots_pb2.StatSnapshotRequest(
                snapshotter=container.snapshotter, key=container.snapshot_key
            )
            try:
                stubs.snapshots.Stat(request, metadata=md(namespace), timeout=30)
            except grpc.RpcError as exc:
                problems.append(
                    f"container {namespace}/{container.id}: snapshot {container.snapshot_key}: {exc.code()}"
                )
    return problems


def pid_alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False


def exec_true(stubs: Stubs, namespace: str, container_id: str, exec_id: str) -> int:
    process = {"args": ["true"], "cwd": "/", "env": [specs.DEFAULT_PATH], "user": {"uid": 0, "gid": 0}}
    request = tasks_pb2.ExecProcessRequest(
        container_id=container_id,
        exec_id=exec_id,
        spec=any_pb2.Any(type_url=PROCESS_URL, value=json.dumps(process).encode()),
    )
    stubs.tasks.Exec(request, metadata=md(namespace), timeout=30)
    stubs.tasks.Start(
        tasks_pb2.StartRequest(container_id=container_id, exec_id=exec_id), metadata=md(namespace)
    )
    status = stubs.tasks.Wait(
        tasks_pb2.WaitRequest(container_id=container_id, exec_id=exec_id), metadata=md(namespace), timeout=30
    ).exit_status
    stubs.tasks.DeleteProcess(
        tasks_pb2.DeleteProcessRequest(container_id=container_id, exec_id=exec_id), metadata=md(namespace)
    )
    return status


def _check_tasks(stubs: Stubs, namespaces: Iterable[str], running: Sequence[RunningTask]) -> list[str]:
    problems = []
    for namespace in namespaces:
        listing = stubs.tasks.List(tasks_pb2.ListTasksRequest(), metadata=md(namespace), timeout=30)
        for task in listing.tasks:
            try:
                got = stubs.tasks.Get(
                    tasks_pb2.GetRequest(container_id=task.id), metadata=md(namespace)
                ).process
            except grpc.RpcError as exc:
                problems.append(
                    f"task {namespace}/{task.id}: listed but Get fails: {exc.code().name} {exc.details()}"
                )
                continue
            if got.status == task_pb2.RUNNING and not pid_alive(got.pid):
                problems.append(f"task {namespace}/{task.id}: RUNNING but its pid {got.pid} is gone")
    for task in running:
        what = f"task {task.namespace}/{task.container_id}"
        try:
            got = stubs.tasks.Get(
                tasks_pb2.GetRequest(container_id=task.container_id), metadata=md(task.namespace), timeout=30
            ).process
        except grpc.RpcError as exc:
            problems.append(f"{what} was running before the kill: Get: {exc.code().name} {exc.details()}")
            continue
        if (got.status, got.pid) != (task_pb2.RUNNING, task.pid):
            problems.append(
                f"{what}: {task_pb2.Status.Name(got.status)} pid {got.pid}, was RUNNING pid {task.pid}"
            )
            continue
        try:
            status = exec_true(
                stubs, task.namespace, task.container_id, f"probe{time.monotonic_ns() % 10**9}"
            )
        except grpc.RpcError as exc:
            problems.append(f"{what}: exec fails: {exc.code().name} {exc.details()}")
            continue
        if status != 0:
            problems.append(f"{what}: exec of true exited {status}")
    return problems


# -- cleanup and leaks --------------------------------------------------------------------------


def collect(stubs: Stubs, namespace: str = "default") -> None:
    """A garbage collection, waited for: delete a throwaway lease with sync."""
    lease = f"gc-{time.monotonic_ns()}"
    stubs.leases.Create(leases_pb2.CreateRequest(id=lease), metadata=md(namespace))
    stubs.leases.Delete(leases_pb2.DeleteRequest(id=lease, sync=True), metadata=md(namespace), timeout=120)


def cleanup(daemon: Any, namespaces: Sequence[str] | None = None) -> None:
    """Remove everything through the API (tasks, containers, images, leases, snapshots), then GC."""
    stubs = Stubs(daemon.address)
    try:
        for namespace in namespaces if namespaces is not None else stubs.namespace_names():
            m = md(namespace)
            for task in stubs.tasks.List(tasks_pb2.ListTasksRequest(), metadata=m, timeout=30).tasks:
                with contextlib.suppress(grpc.RpcError):
                    stubs.tasks.Kill(
                        tasks_pb2.KillRequest(container_id=task.id, signal=9, all=True), metadata=m
                    )
                with contextlib.suppress(grpc.RpcError):
                    stubs.tasks.Wait(tasks_pb2.WaitRequest(container_id=task.id), metadata=m, timeout=15)
                stubs.tasks.Delete(tasks_pb2.DeleteTaskRequest(container_id=task.id), metadata=m, timeout=30)
            for container in stubs.containers.List(
                containers_pb2.ListContainersRequest(), metadata=m
            ).containers:
                stubs.containers.Delete(containers_pb2.DeleteContainerRequest(id=container.id), metadata=m)
            for image in stubs.images.List(images_pb2.ListImagesRequest(), metadata=m).images:
                stubs.images.Delete(images_pb2.DeleteImageRequest(name=image.name), metadata=m)
            for lease in stubs.leases.List(leases_pb2.ListRequest(), metadata=m).leases:
                stubs.leases.Delete(leases_pb2.DeleteRequest(id=lease.id), metadata=m)
            for status in stubs.content.ListStatuses(content_pb2.ListStatusesRequest(), metadata=m).statuses:
                with contextlib.suppress(grpc.RpcError):
                    stubs.content.Abort(content_pb2.AbortRequest(ref=status.ref), metadata=m)
            for snapshotter in SNAPSHOTTERS:
                _remove_snapshots(stubs, namespace, snapshotter)
        collect(stubs)
    finally:
        stubs.close()


def _remove_snapshots(stubs: Stubs, namespace: str, snapshotter: str) -> None:
    """Remove a namespace's snapshots, children first (what is left unreferenced by a crash)."""
    for _round in range(20):
        request = snapshots_pb2.ListSnapshotsRequest(snapshotter=snapshotter)
        try:
            infos = [i for r in stubs.snapshots.List(request, metadata=md(namespace)) for i in r.info]
        except grpc.RpcError:
            return
        if not infos:
            return
        parents = {i.parent for i in infos}
        for info in infos:
            if info.name not in parents:
                with contextlib.suppress(grpc.RpcError):
                    stubs.snapshots.Remove(
                        snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=info.name),
                        metadata=md(namespace),
                    )


def temp_files(root: Path) -> list[str]:
    """write_atomic's temporaries and other obvious leftovers under a daemon root."""
    found = []
    for parent, dirs, files in os.walk(root):
        if "/snapshots/" in parent + "/" and os.path.basename(os.path.dirname(parent)) == "snapshots":
            dirs[:] = []  # inside a snapshot: container files, not ours
            continue
        for name in files:
            if ".tmp-" in name or name.endswith((".tmp", ".partial")):
                found.append(os.path.join(parent, name))
    return found


def leaks(daemon: Any, namespaces: Iterable[str] = ()) -> list[str]:
    """What is left after cleanup(): the list of leaks (empty: none)."""
    found = []
    # (the root itself may be a mount: the full-disk tests put it on a loop filesystem)
    found += [f"mount {m}" for m in mounts_under(daemon.root) if m != str(daemon.root)]
    found += [f"mount {m}" for m in mounts_under(daemon.state)]
    found += [f"shim pid {p}" for p in shim_processes(daemon.state)]
    for namespace in namespaces:
        # runc leaves the namespace's parent cgroup (as under containerd); a container's own
        # cgroup below it must be gone.
        found += [f"cgroup {c}" for d in cgroups_of(namespace) for c in Path(d).iterdir() if c.is_dir()]
    ingests = ingest_dir(daemon)
    if ingests.exists():
        found += [f"ingest {e}" for e in os.listdir(ingests)]
    for name in SNAPSHOTTERS:
        directory = snapshotter_root(daemon, name) / "snapshots"
        if directory.exists():
            ids = {str(row["id"]) for row in snapshot_rows(daemon, name)}
            found += [f"{name} snapshots/{e}" for e in os.listdir(directory) if e not in ids]
            found += [
                f"{name} snapshot row {row['namespace']}/{row['name']}" for row in snapshot_rows(daemon, name)
            ]
    found += [f"temp file {f}" for f in temp_files(daemon.root)]
    bundles = daemon.state / TASK_STATE
    if bundles.exists():
        found += [f"bundle {p}" for p in bundles.glob("*/*") if p.is_dir()]
    stubs = Stubs(daemon.address)
    try:
        recorded = set()
        for namespace in stubs.namespace_names():
            recorded |= {
                i.digest
                for r in stubs.content.List(content_pb2.ListContentRequest(), metadata=md(namespace))
                for i in r.info
            }
    finally:
        stubs.close()
    directory = blob_dir(daemon)
    files = {"sha256:" + f for f in os.listdir(directory)} if directory.exists() else set()
    found += [f"blob file without a record {d}" for d in sorted(files - recorded)]
    return found


IMPORT_CHUNK = 256 * 1024


def import_request_stream(data: bytes):
    yield transfer_pb2.ImportRequest(options=transfer_pb2.ImportOptions(unpack=True))
    for start in range(0, len(data), IMPORT_CHUNK):
        yield transfer_pb2.ImportRequest(data=data[start : start + IMPORT_CHUNK])


def import_image(daemon, namespace: str, data: bytes) -> str:
    stubs = Stubs(daemon.address)
    try:
        transfer = transfer_pb2_grpc.TransferStub(stubs.channel)
        last = None
        for progress in transfer.Import(import_request_stream(data), metadata=md(namespace), timeout=120):
            last = progress
        assert last is not None and last.event == "done", last
        return last.image.name
    finally:
        stubs.close()


__all__ = [
    "RUNC",
    "RunningTask",
    "Stubs",
    "check_store",
    "cleanup",
    "collect",
    "import_image",
    "layer_tree",
    "leaks",
    "md",
    "pid_alive",
]


def run_from_image(
    daemon: Any, namespace: str, name: str, fifo_dir: Path, args: Sequence[str] = ("true",)
) -> int:
    """Run a container from an image's top snapshot (what `ctr run` does); its exit status."""
    from fixtures.tasks import SNAPSHOTTER, TaskRig

    stubs = Stubs(daemon.address)
    try:
        image = stubs.images.Get(images_pb2.GetImageRequest(name=name), metadata=md(namespace)).image
        manifest = json.loads(_read_blob(stubs, namespace, image.target.digest))
        config = json.loads(_read_blob(stubs, namespace, manifest["config"]["digest"]))
    finally:
        stubs.close()
    top = chain_ids(config["rootfs"]["diff_ids"])[-1]
    rig = TaskRig(daemon.address, namespace, fifo_dir)
    cid = f"run{time.monotonic_ns() % 10**9}"
    try:
        request = snapshots_pb2.PrepareSnapshotRequest(snapshotter=SNAPSHOTTER, key=cid, parent=top)
        rig.snapshots.Prepare(request, metadata=rig.leased)
        spec = rig.spec(cid, list(args))
        container = containers_pb2.Container(
            id=cid,
            runtime=containers_pb2.Container.Runtime(name=RUNC),
            spec=any_pb2.Any(
                type_url="types.containerd.io/opencontainers/runtime-spec/1/Spec",
                value=json.dumps(spec).encode(),
            ),
            snapshotter=SNAPSHOTTER,
            snapshot_key=cid,
        )
        rig.containers.Create(containers_pb2.CreateContainerRequest(container=container), metadata=rig.leased)
        rig.create_task(cid)
        rig.start(cid)
        status = rig.wait(cid)
        rig.delete_task(cid)
        rig.remove_container(cid)
        return status
    finally:
        rig.close()
