"""The measurements. Each row function takes the Bench and returns its Rows; a daemon that cannot do
a row's work gets "n/a (reason)" in that row, and the row goes on for the other daemon.

Both daemons are driven by the same client (containerd's `ctr`, or one Python gRPC client built on
our generated stubs), so client cost is equal. Repetitions alternate which daemon goes first, so a
slow drift of the machine (page cache, writeback) does not always land on the same side.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from bench.daemons import (
    CTR,
    CtrResult,
    Daemon,
    Registry,
    Runtimed,
    Workspace,
    child_env,
    parent_map,
    run_timed,
)
from bench.images import BenchImage, top_chain_id
from bench.measure import Row, cpu_seconds, disk_usage, pss_mib, rss_mib, tree_signature

NS = "rtdbench-"  # every namespace we make starts with this (cgroups are named after it too)
BACKENDS = {  # backend -> runtime name, as ctr --runtime takes it
    "runc": "io.containerd.runc.v2",
    "native": "io.runtimed.native.v1",
    "gvisor": "io.containerd.runsc.v1",
    "kata": "io.containerd.kata.v2",
}
SPEC_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Spec"


@dataclass
class Reps:
    pull: int
    imports: int
    list_containers: int
    list_calls: int
    run: int
    concurrent: int
    concurrent_n: int
    running: tuple[int, ...]  # how many running containers to measure memory at
    backends: tuple[str, ...]

    @classmethod
    def for_mode(cls, quick: bool) -> Reps:
        if quick:  # CI smoke test: every row once over, well under two minutes
            return cls(
                pull=3, imports=3, list_containers=1000, list_calls=10, run=5,
                concurrent=1, concurrent_n=50, running=(10,), backends=("runc",),
            )  # fmt: skip
        return cls(
            pull=5, imports=5, list_containers=1000, list_calls=20, run=10,
            concurrent=3, concurrent_n=50, running=(10, 100), backends=tuple(BACKENDS),
        )  # fmt: skip


@dataclass
class Bench:
    workspace: Workspace
    runtimed: Runtimed
    containerd: Daemon
    registry: Registry
    image: BenchImage  # pulled and imported (large, or small with --quick)
    small: BenchImage  # what containers run
    refs: dict[str, str]  # image kind -> registry reference
    reps: Reps
    log: Callable[[str], None]
    notes: list[str] = field(default_factory=list)  # anomalies worth a line in the report
    run_ok: dict[str, bool] = field(default_factory=dict)  # daemon -> can it `ctr run` (runc)?
    run_reason: dict[str, str] = field(default_factory=dict)

    @property
    def daemons(self) -> tuple[Daemon, Daemon]:
        return (self.runtimed, self.containerd)

    def order(self, rep: int) -> tuple[Daemon, Daemon]:
        return self.daemons if rep % 2 == 0 else self.daemons[::-1]

    def note(self, text: str) -> None:
        self.log(f"  note: {text}")
        self.notes.append(text)


def _image_label(image: BenchImage) -> str:
    return f"{image.kind} image, {image.layers} layer{'s' if image.layers > 1 else ''}"


def _count_lines(result: CtrResult) -> int:
    return len([line for line in result.stdout.splitlines()[1:] if line.strip()])


def _check_unpacked(bench: Bench, daemon: Daemon, ns: str, what: str) -> None:
    """A pull or import that 'succeeds' without unpacking would flatter the figure: check once."""
    snapshots = daemon.ctr("snapshots", "ls", namespace=ns)
    count = _count_lines(snapshots) if snapshots.ok else -1
    if count < bench.image.layers:
        bench.note(
            f"{daemon.name}: after {what}, `ctr -n {ns} snapshots ls` shows {count} snapshots "
            f"for a {bench.image.layers}-layer image "
            f"({snapshots.reason() if not snapshots.ok else 'not unpacked?'})"
        )


def _remove_image(bench: Bench, daemon: Daemon, ns: str, names: list[str], rm_row: Row | None) -> None:
    result = daemon.ctr("images", "rm", "--sync", *names, namespace=ns)
    if not result.ok:
        bench.note(f"{daemon.name}: `ctr -n {ns} images rm --sync` failed: {result.reason()}")
        return
    if rm_row is not None:
        rm_row.add(daemon.name, result.seconds)
    left_content = daemon.ctr("content", "ls", "-q", namespace=ns)
    left_snaps = daemon.ctr("snapshots", "ls", namespace=ns)
    blobs = len(left_content.stdout.split()) if left_content.ok else 0
    snaps = _count_lines(left_snaps) if left_snaps.ok else 0
    if blobs or snaps:
        bench.note(
            f"{daemon.name}: after `ctr -n {ns} images rm --sync`, {blobs} blobs and {snaps} snapshots "
            "are still listed in the namespace (garbage collection did not free them)"
        )


def _root_usage_note(bench: Bench, when: str) -> None:
    sizes = {d.name: disk_usage(d.root) / 1e6 for d in bench.daemons}
    bench.log(f"  root disk usage {when}: " + ", ".join(f"{k} {v:.0f} MB" for k, v in sizes.items()))
    if sizes["runtimed"] > max(50.0, 2 * sizes["containerd"]):
        bench.note(
            f"root disk usage {when}: runtimed {sizes['runtimed']:.0f} MB vs containerd "
            f"{sizes['containerd']:.0f} MB (space not reclaimed by images rm --sync)"
        )


def _tree_signature(bench: Bench, daemon: Daemon, ns: str) -> dict[str, tuple[object, ...]] | str:
    """Every path of the unpacked image (a read-only view of the top snapshot) with its type, mode,
    owner, size, mtime, link count, link target and content hash; or why it could not be read."""
    key = f"bench-view-{daemon.name}"
    target = bench.workspace.base / f"view-{daemon.name}"
    target.mkdir(exist_ok=True)
    view = daemon.ctr("snapshots", "view", "--mounts", key, top_chain_id(bench.image), namespace=ns)
    if not view.ok:
        return f"ctr snapshots view: {view.reason()}"
    mounted = False
    try:
        mounts = json.loads(view.stdout or "[]")
        if len(mounts) != 1:
            return f"unexpected mounts {mounts}"
        mount = {k.lower(): v for k, v in mounts[0].items()}  # Go's JSON says Type, Source, Options
        options = ",".join(mount.get("options") or [])
        argv = ["mount", "-t", mount["type"]] if mount["type"] != "bind" else ["mount"]
        result = run_timed([*argv, "-o", options, mount["source"], str(target)], timeout=60)
        if not result.ok:
            return f"mount: {result.reason()}"
        mounted = True
        return tree_signature(target)
    except (OSError, ValueError, KeyError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        if mounted:
            subprocess.run(["umount", str(target)], check=False)
        daemon.ctr("snapshots", "rm", key, namespace=ns)


def _compare_trees(bench: Bench, reference: dict[str, tuple[object, ...]], label: str, other: object) -> None:
    if isinstance(other, str):
        bench.note(f"{label}: could not read the unpacked tree: {other}")
        return
    assert isinstance(other, dict)
    missing = sorted(set(reference) - set(other))
    extra = sorted(set(other) - set(reference))
    differ = sorted(p for p in set(reference) & set(other) if reference[p] != other[p])
    if not (missing or extra or differ):
        bench.log(f"  {label}: unpacked tree identical to containerd's ({len(reference):,} paths)")
        return
    fields = ("type", "mode", "uid", "gid", "size", "mtime", "nlink", "link", "sha256")
    kinds: dict[str, int] = {}
    for path in differ:
        for name, a, b in zip(fields, reference[path], other[path], strict=True):
            if a != b:
                kinds[name] = kinds.get(name, 0) + 1
    example = ""
    if differ:
        path = differ[0]
        example = f"; e.g. {path}: containerd {reference[path]} vs {other[path]}"
    bench.note(
        f"{label}: unpacked tree differs from containerd's: {len(missing)} paths missing "
        f"{missing[:3]}, {len(extra)} extra {extra[:3]}, {len(differ)} differ (by field: {kinds}){example}"
    )


# --- (1) import -------------------------------------------------------------------------------------


def row_import(bench: Bench) -> list[Row]:
    image = bench.image
    row = Row("import", f"ctr images import ({_image_label(image)})", "s")
    cpu = Row("cpu", f"daemon CPU time per ctr images import ({image.kind} image)", "s")
    for rep in range(bench.reps.imports):
        for daemon in bench.order(rep):
            if daemon.name in row.na:
                continue
            ns = f"{NS}import-{rep}"
            os.sync()  # no writeback of the previous repetition lands in this one
            before = cpu_seconds(daemon.pid)
            result = daemon.ctr("images", "import", str(image.archive), namespace=ns)
            if not result.ok:
                row.na[daemon.name] = cpu.na[daemon.name] = result.reason()
                continue
            row.add(daemon.name, result.seconds)
            cpu.add(daemon.name, cpu_seconds(daemon.pid) - before)
            bench.log(f"  import #{rep} {daemon.name}: {result.seconds:.2f} s")
            if rep == 0:
                _check_unpacked(bench, daemon, ns, "import")
            _remove_image(bench, daemon, ns, [image.name], None)
    _root_usage_note(bench, "after the import row (every image removed with rm --sync)")
    return [row, cpu]


# --- (2) pull + unpack ------------------------------------------------------------------------------


def _runtimectl_pull_available(bench: Bench) -> str | None:
    """None when `runtimectl pull` exists, else why not."""
    probe = run_timed(bench.runtimed.runtimectl_argv("pull", "--help"), timeout=60)
    if probe.ok:
        return None
    return probe.reason() if "invalid choice" not in probe.stderr else "runtimectl has no pull command yet"


def row_pull(bench: Bench) -> list[Row]:
    image, ref = bench.image, bench.refs[bench.image.kind]
    label = _image_label(image)
    ctr_row = Row("pull", f"pull+unpack, ctr images pull --plain-http ({label})", "s", target=1.0)
    own_row = Row("pull", f"pull+unpack, runtimectl pull vs containerd's ctr pull ({label})", "s", target=1.0)
    rm_row = Row("pull", "ctr images rm --sync after a pull (GC frees the image)", "s")
    ctr_cpu = Row("cpu", f"daemon CPU time per ctr images pull ({image.kind} image)", "s")
    own_cpu = Row("cpu", f"daemon CPU time per pull, runtimectl vs ctr ({image.kind} image)", "s")
    missing = _runtimectl_pull_available(bench)
    if missing:
        own_row.na["runtimed"] = own_cpu.na["runtimed"] = missing
    trees: dict[str, object] = {}
    # Each repetition: containerd via ctr, runtimed via ctr, runtimed via runtimectl (order rotates).
    for rep in range(bench.reps.pull):
        jobs: list[tuple[Daemon, str]] = [(bench.containerd, "ctr"), (bench.runtimed, "ctr")]
        if not missing:
            jobs.append((bench.runtimed, "runtimectl"))
        shift = rep % len(jobs)
        for daemon, client in jobs[shift:] + jobs[:shift]:
            time_row, cpu_row = (ctr_row, ctr_cpu) if client == "ctr" else (own_row, own_cpu)
            if daemon.name in time_row.na:
                continue
            ns = f"{NS}pull-{client}-{rep}"
            if client == "ctr":
                argv = daemon.ctr_argv("images", "pull", "--plain-http", ref, namespace=ns)
            else:
                argv = bench.runtimed.runtimectl_argv(
                    "--timeout", "900", "pull", "--plain-http", ref, namespace=ns
                )
            os.sync()  # no writeback of the previous repetition lands in this one
            before = cpu_seconds(daemon.pid)
            result = run_timed(argv, timeout=900)
            if not result.ok:
                time_row.na[daemon.name] = cpu_row.na[daemon.name] = result.reason()
                bench.log(f"  pull #{rep} {daemon.name} via {client}: FAILED {result.reason()}")
                continue
            used = cpu_seconds(daemon.pid) - before
            time_row.add(daemon.name, result.seconds)
            cpu_row.add(daemon.name, used)
            if daemon.name == "containerd":  # the same work on containerd's side
                own_row.add("containerd", result.seconds)
                own_cpu.add("containerd", used)
            bench.log(
                f"  pull #{rep} {daemon.name} via {client}: {result.seconds:.2f} s (daemon CPU {used:.2f} s)"
            )
            if rep == 0:
                _check_unpacked(bench, daemon, ns, f"{client} pull")
                trees[f"{daemon.name} via {client} pull"] = _tree_signature(bench, daemon, ns)
            _remove_image(bench, daemon, ns, [ref], rm_row)
    for row in (own_row, own_cpu):
        if "containerd" in ctr_row.na:
            row.na["containerd"] = ctr_row.na["containerd"]
    reference = trees.pop("containerd via ctr pull", None)
    if isinstance(reference, dict):
        for label_, tree in trees.items():
            _compare_trees(bench, reference, label_, tree)
    _root_usage_note(bench, "after the pull row (every image removed with rm --sync)")
    return [ctr_row, own_row, rm_row, ctr_cpu, own_cpu, _client_row(bench, missing)]


def _client_row(bench: Bench, missing: str | None) -> Row:
    """What a CLI costs before any work: it weighs on small pulls (Python start-up vs a Go binary)."""
    row = Row("pull", "client start-up + one Version call: runtimectl version vs ctr version", "ms")
    if missing:
        row.na["runtimed"] = missing
    for rep in range(2 * bench.reps.pull):
        for daemon in bench.order(rep):
            if daemon.name in row.na:
                continue
            if daemon is bench.runtimed:
                result = run_timed(bench.runtimed.runtimectl_argv("version"), timeout=60)
            else:
                result = daemon.ctr("version", timeout=60)
            if not result.ok:
                row.na[daemon.name] = result.reason()
                continue
            row.add(daemon.name, result.seconds * 1000)
    return row


# --- (3) Containers.List with many containers -------------------------------------------------------


def _containers_client(daemon: Daemon) -> tuple[object, object, object]:
    import grpc

    from runtimed.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc

    channel = grpc.insecure_channel(
        f"unix://{daemon.socket}",
        options=[("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 64 << 20)],
    )
    return channel, containers_pb2_grpc.ContainersStub(channel), containers_pb2


def row_list(bench: Bench) -> list[Row]:
    from google.protobuf import any_pb2

    count = bench.reps.list_containers
    create_row = Row("list", f"Containers.Create x{count:,}, one client, one at a time (total)", "s")
    list_row = Row("list", f"Containers.List, {count:,} containers (all, unary)", "ms")
    stream_row = Row("list", f"Containers.ListStream, {count:,} containers", "ms")
    filter_row = Row("list", f'Containers.List, {count:,} containers, filter labels."idx"==7', "ms")
    memory_row = Row("rss", f"daemon RSS with {count:,} containers (metadata only)", "MiB")
    spec = run_timed([CTR, "oci", "spec"]).stdout.encode()  # the spec `ctr run` would store (~5 KB)
    ns = f"{NS}list"
    metadata = (("containerd-namespace", ns),)
    for daemon in bench.daemons:
        channel, stub, pb = _containers_client(daemon)
        try:
            start = time.perf_counter()
            try:
                for i in range(count):
                    container = pb.Container(  # type: ignore[attr-defined]
                        id=f"bench-{i:05d}",
                        labels={"idx": str(i), "app": "bench", "tier": ("web", "db", "cache")[i % 3]},
                        image=bench.small.name,
                        runtime=pb.Container.Runtime(name=BACKENDS["runc"]),  # type: ignore[attr-defined]
                        spec=any_pb2.Any(type_url=SPEC_TYPE, value=spec),
                        snapshotter="overlayfs",
                        snapshot_key=f"bench-{i:05d}",
                    )
                    stub.Create(  # type: ignore[attr-defined]
                        pb.CreateContainerRequest(container=container),  # type: ignore[attr-defined]
                        metadata=metadata,
                        timeout=60,
                    )
            except Exception as exc:
                reason = _grpc_reason(exc)
                for row in (create_row, list_row, stream_row, filter_row, memory_row):
                    row.na[daemon.name] = f"create failed: {reason}"
                continue
            create_row.add(daemon.name, time.perf_counter() - start)
            bench.log(f"  created {count} containers in {daemon.name}: {time.perf_counter() - start:.2f} s")
            memory_row.add(daemon.name, rss_mib(daemon.pid))
        finally:
            channel.close()  # type: ignore[attr-defined]
    calls: list[tuple[Row, Callable[[object, object], int]]] = [
        (
            list_row,
            lambda stub, pb: len(
                stub.List(pb.ListContainersRequest(), metadata=metadata, timeout=60).containers
            ),
        ),  # type: ignore[attr-defined]
        (
            stream_row,
            lambda stub, pb: sum(
                1 for _ in stub.ListStream(pb.ListContainersRequest(), metadata=metadata, timeout=60)
            ),  # type: ignore[attr-defined]
        ),
        (
            filter_row,
            lambda stub, pb: len(
                stub.List(
                    pb.ListContainersRequest(filters=['labels."idx"==7']), metadata=metadata, timeout=60
                ).containers  # type: ignore[attr-defined]
            ),
        ),
    ]
    clients = {d.name: _containers_client(d) for d in bench.daemons if d.name not in list_row.na}
    try:
        for row, call in calls:
            expected = 1 if row is filter_row else count
            for _channel, stub, pb in clients.values():
                with suppress(Exception):
                    call(stub, pb)  # warm-up: connection set-up is not what we measure
            for rep in range(bench.reps.list_calls):
                for daemon in bench.order(rep):
                    if daemon.name not in clients or daemon.name in row.na:
                        continue
                    _channel, stub, pb = clients[daemon.name]
                    start = time.perf_counter()
                    try:
                        got = call(stub, pb)
                    except Exception as exc:
                        row.na[daemon.name] = _grpc_reason(exc)
                        continue
                    row.add(daemon.name, (time.perf_counter() - start) * 1000)
                    if got != expected:
                        row.na[daemon.name] = f"returned {got} containers, expected {expected}"
        for name, (_channel, stub, pb) in clients.items():  # leave the daemons as we found them
            for i in range(count):
                with suppress(Exception):
                    stub.Delete(pb.DeleteContainerRequest(id=f"bench-{i:05d}"), metadata=metadata, timeout=60)  # type: ignore[attr-defined]
            bench.log(f"  deleted the {count} containers in {name}")
    finally:
        for channel, _stub, _pb in clients.values():
            channel.close()  # type: ignore[attr-defined]
    return [create_row, list_row, stream_row, filter_row, memory_row]


def _grpc_reason(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        return f"{code().name}: {(details() or '').splitlines()[0][:120]}"
    return f"{type(exc).__name__}: {exc}"[:160]


# --- (4) memory at rest -----------------------------------------------------------------------------


def rss_row(bench: Bench, title: str) -> Row:
    row = Row("rss", title, "MiB")
    for daemon in bench.daemons:
        if daemon.alive():
            row.add(daemon.name, rss_mib(daemon.pid))
        else:
            row.na[daemon.name] = "daemon exited"
    return row


# --- (5) ctr run --rm -------------------------------------------------------------------------------


RUN_NS = f"{NS}run"


def _prepare_run(bench: Bench) -> None:
    """Import the busybox image for running, once per daemon; probe `ctr run` with runc."""
    if bench.run_ok:
        return
    for daemon in bench.daemons:
        imported = daemon.ctr("images", "import", str(bench.small.archive), namespace=RUN_NS)
        if not imported.ok:
            bench.run_ok[daemon.name] = False
            bench.run_reason[daemon.name] = f"import failed: {imported.reason()}"
            continue
        probe = _run_once(daemon, "probe-runc", BACKENDS["runc"], bench.small.name)
        bench.run_ok[daemon.name] = probe.ok
        if not probe.ok:
            reason = probe.reason()
            unimplemented = "not implemented" in reason.lower()
            bench.run_reason[daemon.name] = (
                f"Tasks not implemented yet: {reason}" if unimplemented else reason
            )
            _force_remove(daemon, RUN_NS, ["probe-runc"])


def _run_once(daemon: Daemon, cid: str, runtime: str, image: str) -> CtrResult:
    return daemon.ctr("run", "--rm", "--runtime", runtime, image, cid, "true", namespace=RUN_NS, timeout=120)


def _force_remove(daemon: Daemon, ns: str, ids: list[str]) -> None:
    for cid in ids:
        daemon.ctr("tasks", "rm", "-f", cid, namespace=ns, timeout=60)
        daemon.ctr("containers", "rm", cid, namespace=ns, timeout=60)


def row_run(bench: Bench) -> list[Row]:
    _prepare_run(bench)
    rows = []
    for backend in bench.reps.backends:
        runtime = BACKENDS[backend]
        row = Row(
            "run",
            f"ctr run --rm busybox true ({backend}: {runtime})",
            "ms",
            target=1.0 if backend == "runc" else None,
            optional=backend != "runc",
        )
        for daemon in bench.daemons:
            if not bench.run_ok.get(daemon.name):
                row.na[daemon.name] = bench.run_reason.get(daemon.name, "cannot run containers")
            elif backend != "runc":
                probe = _run_once(daemon, f"probe-{backend}", runtime, bench.small.name)
                if not probe.ok:
                    row.na[daemon.name] = probe.reason()
                    _force_remove(daemon, RUN_NS, [f"probe-{backend}"])
        # Daemon CPU (utime+stime, with the children it reaped: containerd's `shim start`, any
        # runc it forks) summed over the repetitions: /proc counts in 10 ms ticks, so one run's
        # figure alone is mostly rounding. Load-independent, unlike the wall time above.
        cpu = Row("cpu", f"daemon CPU time per ctr run --rm ({backend}), mean over the runs", "ms")
        cpu_total: dict[str, float] = {}
        failures: dict[str, list[str]] = {}
        for rep in range(bench.reps.run):
            for daemon in bench.order(rep):
                if daemon.name in row.na:
                    continue
                before = cpu_seconds(daemon.pid)
                result = _run_once(daemon, f"run-{backend}-{rep}", runtime, bench.small.name)
                if not result.ok:  # an occasional failure is a finding, not the end of the row
                    failures.setdefault(daemon.name, []).append(result.reason())
                    _force_remove(daemon, RUN_NS, [f"run-{backend}-{rep}"])
                    if len(failures[daemon.name]) > bench.reps.run // 2:
                        row.na[daemon.name] = result.reason()
                    continue
                cpu_total[daemon.name] = cpu_total.get(daemon.name, 0.0) + cpu_seconds(daemon.pid) - before
                row.add(daemon.name, result.seconds * 1000)
        for daemon in bench.daemons:
            runs = len(row.samples[daemon.name])
            if daemon.name in row.na:
                cpu.na[daemon.name] = row.na[daemon.name]
            elif runs:
                cpu.add(daemon.name, cpu_total[daemon.name] * 1000 / runs)
        for name, reasons in failures.items():
            row.note += f"{name}: {len(reasons)} of {bench.reps.run} runs failed; "
            bench.note(
                f"{name}: `ctr run --rm` ({backend}) failed {len(reasons)} of {bench.reps.run} times: "
                f"{reasons[0]}"
            )
        rows.append(row)
        if backend == "runc":
            rows.append(cpu)
    return rows


# --- (6) shim memory with running containers --------------------------------------------------------


def shim_pids(daemon: Daemon, ns: str) -> tuple[list[int], int]:
    """(the shim-side processes, running tasks) of a daemon's namespace.

    A shim is the parent of a container's init process (whatever its command line: a forked shim
    has its zygote's); the daemon's own non-container children (a shim zygote, say) are shim
    cost too, since PSS splits their shared pages with the shims. runc is transient and skipped.
    """
    tasks = daemon.ctr("tasks", "ls", namespace=ns, timeout=60)
    lines = [line.split() for line in tasks.stdout.splitlines()[1:] if line.strip()]
    inits = {int(cols[1]) for cols in lines if len(cols) >= 3 and cols[2] == "RUNNING" and cols[1].isdigit()}
    parents = parent_map()
    found = {parents[pid] for pid in inits if pid in parents} - {0, 1, daemon.pid}
    own_pidns = _pidns("self")
    for pid, ppid in parents.items():
        if ppid == daemon.pid and pid not in inits and _pidns(str(pid)) == own_pidns:
            try:
                argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if Path(argv0).name != "runc":
                found.add(pid)
    return sorted(found), len(inits)


def _pidns(pid: str) -> str:
    try:
        return str(Path(f"/proc/{pid}/ns/pid").readlink())
    except OSError:
        return ""


def row_shim(bench: Bench) -> list[Row]:
    _prepare_run(bench)
    counts = bench.reps.running
    shim_rows = {
        n: Row("shim", f"shim PSS per running container ({n} running)", "MiB", target=1.0) for n in counts
    }
    rss_rows = {n: Row("rss", f"daemon RSS with {n} running containers", "MiB") for n in counts}
    ns = f"{NS}shim"
    for daemon in bench.daemons:
        if not bench.run_ok.get(daemon.name):
            for row in (*shim_rows.values(), *rss_rows.values()):
                row.na[daemon.name] = bench.run_reason.get(daemon.name, "cannot run containers")
            continue
        imported = daemon.ctr("images", "import", str(bench.small.archive), namespace=ns)
        if not imported.ok:
            for row in (*shim_rows.values(), *rss_rows.values()):
                row.na[daemon.name] = f"import failed: {imported.reason()}"
            continue
        started: list[str] = []
        try:
            for n in counts:
                while len(started) < n:
                    cid = f"sleep-{len(started):03d}"
                    result = daemon.ctr(
                        "run", "-d", bench.small.name, cid, "sleep", "3600", namespace=ns, timeout=120
                    )
                    if not result.ok:  # once more, under a new name: one flake must not sink the row
                        bench.note(f"{daemon.name}: ctr run -d {cid} failed once: {result.reason()}")
                        _force_remove(daemon, ns, [cid])
                        cid += "-again"
                        result = daemon.ctr(
                            "run", "-d", bench.small.name, cid, "sleep", "3600", namespace=ns, timeout=120
                        )
                    if not result.ok:
                        raise RuntimeError(f"ctr run -d {cid}: {result.reason()}")
                    started.append(cid)
                time.sleep(1.0)  # let start-up allocations settle
                shims, running = shim_pids(daemon, ns)
                if running != n:
                    raise RuntimeError(f"{running} tasks RUNNING in {ns}, expected {n}")
                total = 0.0
                for pid in shims:
                    with suppress(OSError):
                        total += pss_mib(pid)
                shim_rows[n].add(daemon.name, total / n)
                rss_rows[n].add(daemon.name, rss_mib(daemon.pid))
                bench.log(
                    f"  {daemon.name}: {n} running, {len(shims)} shim processes, {total:.1f} MiB PSS in all"
                )
                if not shims:
                    shim_rows[n].na[daemon.name] = "no shim process found"
        except RuntimeError as exc:
            for n in counts:
                if not shim_rows[n].samples[daemon.name]:
                    shim_rows[n].na[daemon.name] = str(exc)[:160]
                    rss_rows[n].na[daemon.name] = str(exc)[:160]
        finally:
            _parallel_remove(daemon, ns, started)
    return [*shim_rows.values(), *rss_rows.values()]


def _parallel_remove(daemon: Daemon, ns: str, ids: list[str], width: int = 8) -> None:
    """Kill and delete containers, `width` at a time (100 one by one is slow and not measured)."""
    for i in range(0, len(ids), width):
        batch = ids[i : i + width]
        procs = [
            subprocess.Popen(
                [
                    "sh",
                    "-c",
                    '"$@" tasks rm -f "$0"; "$@" containers rm "$0"',
                    cid,
                    *daemon.ctr_argv(namespace=ns),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=child_env(),
            )
            for cid in batch
        ]
        for proc in procs:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- (7) many containers at once --------------------------------------------------------------------


def row_concurrent(bench: Bench) -> list[Row]:
    _prepare_run(bench)
    n = bench.reps.concurrent_n
    row = Row("concurrent", f"{n} x `ctr run --rm … true` started at once (wall time for all)", "s")
    for daemon in bench.daemons:
        if not bench.run_ok.get(daemon.name):
            row.na[daemon.name] = bench.run_reason.get(daemon.name, "cannot run containers")
    for rep in range(bench.reps.concurrent):
        for daemon in bench.order(rep):
            if daemon.name in row.na:
                continue
            ids = [f"conc-{rep}-{i:02d}" for i in range(n)]
            start = time.perf_counter()
            procs = [
                subprocess.Popen(
                    daemon.ctr_argv("run", "--rm", bench.small.name, cid, "true", namespace=RUN_NS),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    env=child_env(),
                )
                for cid in ids
            ]
            failures = []
            for cid, proc in zip(ids, procs, strict=True):
                try:
                    _, err = proc.communicate(timeout=300)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    _, err = proc.communicate()
                if proc.returncode != 0:
                    failures.append((cid, err.decode(errors="replace").strip().splitlines()[-1:] or ["?"]))
            elapsed = time.perf_counter() - start
            if failures:
                row.na[daemon.name] = f"{len(failures)} of {n} failed: {failures[0][1][0][:120]}"
                _parallel_remove(daemon, RUN_NS, [cid for cid, _ in failures])
                continue
            row.add(daemon.name, elapsed)
            bench.log(f"  {n} concurrent on {daemon.name}: {elapsed:.2f} s ({n / elapsed:.1f} containers/s)")
    for daemon in bench.daemons:
        median = row.median(daemon.name)
        if median:
            row.note += f"{daemon.name} {n / median:.1f}/s; "
    return [row]


def leftover_tasks(daemon: Daemon) -> Iterator[tuple[str, str]]:
    """(namespace, container) of every container still present in our namespaces."""
    namespaces = daemon.ctr("namespaces", "ls", "-q", timeout=30)
    for ns in namespaces.stdout.split() if namespaces.ok else []:
        if not ns.startswith(NS):
            continue
        containers = daemon.ctr("containers", "ls", "-q", namespace=ns, timeout=30)
        for cid in containers.stdout.split() if containers.ok else []:
            yield ns, cid


def teardown_containers(daemon: Daemon) -> None:
    """Best effort, before stopping a daemon: no container of ours outlives the run."""
    if not daemon.alive():
        return
    by_ns: dict[str, list[str]] = {}
    for ns, cid in leftover_tasks(daemon):
        by_ns.setdefault(ns, []).append(cid)
    for ns, ids in by_ns.items():
        _parallel_remove(daemon, ns, ids)
