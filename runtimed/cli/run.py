"""`runtimectl run [OPTIONS] IMAGE [CMD...]` and `runtimectl create`: docker's run, against the daemon.

The container's ID is its name (`--name`, validated as docker does, else a generated
`adjective_surname`). The image is looked up by its exact name, then by its normalised form
(`busybox` -> `docker.io/library/busybox:latest`) and pulled (by the daemon, progress on stderr)
when missing. The spec is containerd's default (runtimed.tasks.spec) with the image config merged
as docker merges it: Entrypoint/Cmd (`--entrypoint` resets Cmd, CMD arguments replace it), Env
(image, then --env-file, then -e), WorkingDir, User (names resolved through the image's
/etc/passwd and /etc/group), hostname (default: the name's first 12 characters), bind mounts
and named volumes (`-v`), and resource limits (--memory, --cpus, --pids-limit).

Attached, runtimectl copies the process's stdio and exits with its exit status; detached (-d) it
prints the name and the process writes to `<log_dir>/<namespace>/<name>.log` on the daemon's
host, as JSON lines (see shim.stdio; `runtimectl logs` reads them). Exit codes are docker's:
125 when runtimectl or the daemon fails, 126 when the command cannot be invoked, 127 when it is
not found. What runtimectl needs to show the container later (docker's ps and inspect) is kept in
the container's labels (`runtimed/...`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtimed.cli.common import ERROR_EXIT, CLIError, Context, report
from runtimed.cli.names import generate_name, validate_name
from runtimed.cli.tasks import (
    Attachment,
    LogCopy,
    Stubs,
    forwarding_signals,
    raw_terminal,
    resize,
    wait_exit,
)
from runtimed.wire import LEASE_KEY, NAMESPACE_KEY

SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
DEFAULT_RUNTIME = "io.containerd.runc.v2"
TASK_PLUGIN = ("io.containerd.runtime.v2", "task")
STOP_SIGNAL_LABEL = "io.containerd.image.config.stop-signal"
# What runtimectl keeps about a container for ps, inspect, start and logs.
LABEL_LOG_URI = "runtimed/log-uri"
LABEL_MOUNTS = "runtimed/mounts"  # JSON: [{type, name?, source, destination, mode, rw}]
LABEL_ENTRYPOINT = "runtimed/entrypoint"  # JSON list
LABEL_CMD = "runtimed/cmd"  # JSON list
LABEL_STARTED = "runtimed/started-at"  # RFC 3339, set at each start
LABEL_FINISHED = "runtimed/finished-at"  # RFC 3339, set when runtimectl saw the task end
LABEL_EXIT_CODE = "runtimed/exit-code"
LABEL_ERROR = "runtimed/error"  # why the last start failed
LABEL_AUTO_REMOVE = "runtimed/auto-remove"  # run -d --rm: removed when its task ends
AUTO_REMOVE_GIVE_UP = 300.0  # seconds without a daemon after which the -d --rm watcher gives up
CANNOT_INVOKE = 126
NOT_FOUND = 127
MIN_MEMORY = 6 * 1024 * 1024  # docker's minimum
CPU_PERIOD = 100_000
VOLUME_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser(
        "run",
        help="run a command in a new container",
        description="Create a container from an image (pulled when missing) and run its command, like "
        "docker run. Exit status: the command's; 125 if runtimectl or the daemon failed, 126 if the "
        "command cannot be invoked, 127 if it was not found.",
    )
    run.add_argument("-d", "--detach", action="store_true", help="run in the background; print the name")
    run.add_argument("--rm", action="store_true", help="remove the container when it exits")
    add_container_options(run)
    run.set_defaults(func=run_container)

    create = subparsers.add_parser(
        "create",
        help="create a container without starting it",
        description="Create a container from an image (pulled when missing), like docker create; "
        "`runtimectl start` runs it. Prints the name.",
    )
    add_container_options(create)
    create.set_defaults(func=create_only)

    # run -d --rm: the detached watcher that removes the container when its task ends (no help: internal).
    watcher = subparsers.add_parser("_autoremove", add_help=False)
    watcher.add_argument("name")
    watcher.set_defaults(func=auto_remove)


def add_container_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="", help="the container's name (and ID); default: generated")
    parser.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    parser.add_argument("-i", "--interactive", action="store_true", help="connect stdin")
    parser.add_argument(
        "-e",
        "--env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="set a variable (NAME alone: the value here)",
    )
    parser.add_argument("--env-file", action="append", default=[], metavar="FILE", help="read variables")
    parser.add_argument("-w", "--workdir", default="", metavar="DIR", help="working directory")
    parser.add_argument(
        "-u", "--user", default="", metavar="USER[:GROUP]", help="user (name or uid) and group to run as"
    )
    parser.add_argument("--hostname", default="", help="hostname (default: the name's first 12 characters)")
    parser.add_argument("--entrypoint", default=None, help="replace the image's entrypoint (and its Cmd)")
    parser.add_argument(
        "-v",
        "--volume",
        action="append",
        default=[],
        metavar="SRC:DST[:ro|rw]",
        help="bind mount an absolute host path, or mount a named volume (created when missing)",
    )
    parser.add_argument("-m", "--memory", default="", metavar="BYTES", help="memory limit (e.g. 512m, 2g)")
    parser.add_argument("--cpus", default="", metavar="N", help="CPUs (e.g. 1.5)")
    parser.add_argument("--pids-limit", type=int, default=0, metavar="N", help="process limit")
    parser.add_argument(
        "--runtime",
        default=DEFAULT_RUNTIME,
        help=f"runtime: native|runc|gvisor|kata or a full name (default {DEFAULT_RUNTIME})",
    )
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="container label")
    parser.add_argument(
        "--snapshotter", default="", help="snapshotter (default: the namespace's, else overlayfs)"
    )
    parser.add_argument("--log-uri", default="", help="where a detached process writes (file:///PATH)")
    parser.add_argument("--null-io", action="store_true", help="send the process's output nowhere")
    parser.add_argument("--no-seccomp", action="store_true", help="run without the default seccomp profile")
    parser.add_argument("--plain-http", action="store_true", help="pull over HTTP")
    parser.add_argument("image", metavar="IMAGE")
    parser.add_argument("command", metavar="CMD", nargs=argparse.REMAINDER)


# -- option parsing (everything is checked before anything is created) ---------------------------


def parse_bytes(text: str) -> int:
    """docker's RAMInBytes: 512m, 2g, 1.5GB, 100000 (binary units)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)b?", text.strip().lower())
    if not match:
        raise CLIError(f"invalid size {text!r}: use a number with an optional unit b, k, m, g, t")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


@dataclass
class MountRequest:
    kind: str  # "bind" | "volume"
    source: str  # host path or volume name
    destination: str
    readonly: bool = False


def parse_volume(text: str) -> MountRequest:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise CLIError(f"invalid volume {text!r}: expected SRC:DST[:ro|rw]")
    source, destination = parts[0], parts[1]
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise CLIError(f"invalid volume {text!r}: mode {mode!r} is not ro or rw")
    if not destination.startswith("/"):
        raise CLIError(f"invalid volume {text!r}: the destination {destination!r} is not an absolute path")
    if os.path.normpath(destination) == "/":
        raise CLIError(f"invalid volume {text!r}: the destination cannot be /")
    if source.startswith("/"):
        return MountRequest("bind", os.path.normpath(source), os.path.normpath(destination), mode == "ro")
    if not VOLUME_NAME.fullmatch(source):
        raise CLIError(
            f"invalid volume {text!r}: {source!r} is neither an absolute host path nor a volume name "
            "([a-zA-Z0-9][a-zA-Z0-9_.-]*)"
        )
    return MountRequest("volume", source, os.path.normpath(destination), mode == "ro")


def host_env(entries: Sequence[str]) -> list[str]:
    """NAME=VALUE as given; NAME alone takes this process's value (and is dropped when unset)."""
    result = []
    for entry in entries:
        if "=" in entry:
            if entry.startswith("="):
                raise CLIError(f"invalid environment variable {entry!r}")
            result.append(entry)
        elif entry and entry in os.environ:
            result.append(f"{entry}={os.environ[entry]}")
    return result


def env_file_entries(path: str) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise CLIError(f"env file {path}: {exc.strerror}") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


@dataclass
class Plan:
    """The validated options of a run or create."""

    name: str  # "" = generate
    env: list[str]
    mounts: list[MountRequest]
    memory: int = 0
    cpus: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)
    created_volumes: list[str] = field(default_factory=list)  # named volumes this run made


def make_plan(args: argparse.Namespace) -> Plan:
    name = validate_name(args.name) if args.name else ""
    env: list[str] = []
    for path in args.env_file:
        env += host_env(env_file_entries(path))
    env += host_env(args.env)
    mounts = [parse_volume(text) for text in args.volume]
    destinations = [m.destination for m in mounts]
    for destination in destinations:
        if destinations.count(destination) > 1:
            raise CLIError(f"duplicate mount point: {destination}")
    memory = parse_bytes(args.memory) if args.memory else 0
    if args.memory and memory < MIN_MEMORY:
        raise CLIError("minimum memory limit allowed is 6MB")
    cpus = 0.0
    if args.cpus:
        try:
            cpus = float(args.cpus)
        except ValueError:
            raise CLIError(f"invalid --cpus {args.cpus!r}: not a number") from None
        if cpus <= 0 or cpus > os.cpu_count() * 1.0:  # type: ignore[operator]
            raise CLIError(
                f"range of CPUs is from 0.01 to {os.cpu_count()}.00, as there are only "
                f"{os.cpu_count()} CPUs available"
            )
    labels = {}
    for text in args.label:
        key, _, value = text.partition("=")
        if not key:
            raise CLIError(f"invalid label {text!r}: expected KEY=VALUE")
        labels[key] = value
    if args.null_io and (args.tty or args.interactive):
        raise CLIError("--null-io cannot be used with -t or -i")
    return Plan(name, env, mounts, memory, cpus, labels)


# -- daemon services ---------------------------------------------------------------------------


class Services:
    def __init__(self, ctx: Context) -> None:
        from runtimed.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
        from runtimed.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
        from runtimed.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
        from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc

        channel = ctx.client.channel
        self.ctx = ctx
        self.md = [(NAMESPACE_KEY, ctx.namespace)]
        self.content_pb, self.content = content_pb2, content_pb2_grpc.ContentStub(channel)
        self.snapshots_pb, self.snapshots = snapshots_pb2, snapshots_pb2_grpc.SnapshotsStub(channel)
        self.leases_pb, self.leases = leases_pb2, leases_pb2_grpc.LeasesStub(channel)
        self.containers_pb, self.containers = containers_pb2, containers_pb2_grpc.ContainersStub(channel)

    def read(self, digest: str) -> bytes:
        request = self.content_pb.ReadContentRequest(digest=digest)
        return b"".join(
            r.data for r in self.content.Read(request, metadata=self.md, timeout=self.ctx.timeout)
        )

    def mounts(self, snapshotter: str, key: str) -> Any:
        request = self.snapshots_pb.MountsRequest(snapshotter=snapshotter, key=key)
        return self.snapshots.Mounts(request, metadata=self.md, timeout=self.ctx.timeout).mounts

    def update_labels(self, container_id: str, labels: dict[str, str]) -> None:
        """Set (or with "" remove) some labels of a container, leaving the others alone."""
        from google.protobuf import field_mask_pb2

        container = self.containers_pb.Container(
            id=container_id, labels={k: v for k, v in labels.items() if v}
        )
        request = self.containers_pb.UpdateContainerRequest(
            container=container, update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])
        )
        self.containers.Update(request, metadata=self.md, timeout=self.ctx.timeout)


def volumes_stub(ctx: Context) -> tuple[Any, Any]:
    """(volumes_pb2, a Volumes stub); a CLIError when this runtimectl or the daemon has none."""
    try:
        from runtimed.api.runtimed.services.volumes.v1 import volumes_pb2, volumes_pb2_grpc
    except ImportError:
        raise CLIError("named volumes need the Volumes service, which this runtimectl lacks") from None
    return volumes_pb2, volumes_pb2_grpc.VolumesStub(ctx.client.channel)


def is_code(exc: BaseException, name: str) -> bool:
    import grpc

    return isinstance(exc, grpc.RpcError) and hasattr(exc, "code") and exc.code().name == name


# -- images ------------------------------------------------------------------------------------


@dataclass
class ImageInfo:
    name: str
    config: dict[str, Any]
    chain: str  # the top layer's chain ID: the container snapshot's parent
    layers: list[Any]  # layer descriptors, bottom first


def image_info(services: Services, image: Any) -> ImageInfo:
    """The image's config, top chain ID and layers for this host's platform."""
    from runtimed.images import manifest as manifests
    from runtimed.platforms import Platform

    descriptor = image.target
    data = services.read(descriptor.digest)
    if manifests.media_type_of(data, "image target") in manifests.INDEX_TYPES:
        chosen = manifests.select_manifest(
            manifests.parse_index(data), Platform.host(), f"image {image.name}"
        )
        data = services.read(chosen.digest)
    manifest = manifests.parse_manifest(data)
    config = manifests.parse_config(services.read(manifest.config.digest))
    if not config.diff_ids:
        raise CLIError(f"image {image.name} has no layers")
    return ImageInfo(image.name, config.config, manifests.chain_ids(config.diff_ids)[-1], manifest.layers)


def find_or_pull(ctx: Context, reference: str, snapshotter: str, plain_http: bool = False) -> Any:
    """The image by its exact name or normalised form; pulled (progress on stderr) when missing."""
    from runtimed.cli.images import find_image, normalised

    try:
        return find_image(ctx, reference)
    except Exception as exc:
        if not is_code(exc, "NOT_FOUND"):
            raise
    from runtimed.api.runtimed.services.transfer.v1 import transfer_pb2 as pb
    from runtimed.cli.progress import PULL_WORDS, ProgressView
    from runtimed.cli.pull import transfer_stub

    full = normalised(reference)
    print(f"Unable to find image '{reference}' locally", file=sys.stderr)
    request = pb.PullRequest(
        reference=full,
        unpack=True,
        snapshotter=snapshotter,
        registry=pb.RegistryOptions(plain_http=plain_http),
    )
    view = ProgressView(PULL_WORDS, out=sys.stderr)
    stream = transfer_stub(ctx).Pull(request, metadata=[(NAMESPACE_KEY, ctx.namespace)])
    try:
        done = view.follow(stream, f"pull of {full}")
    except Exception as exc:
        if is_code(exc, "NOT_FOUND"):
            raise CLIError(f"image {reference}: not found (locally, nor as {full} in its registry)") from None
        raise
    print(f"Status: Downloaded newer image for {done.name}", file=sys.stderr)
    return ctx.client.image(done.name)


def _layer_files(services: Services, layers: Sequence[Any], wanted: Sequence[str]) -> dict[str, bytes]:
    """The topmost version of some files (e.g. etc/passwd) in an image's layers."""
    found: dict[str, bytes] = {}
    for layer in reversed(layers):
        missing = [name for name in wanted if name not in found]
        if not missing:
            break
        if "zstd" in layer.media_type:
            continue
        try:
            with tarfile.open(fileobj=io.BytesIO(services.read(layer.digest)), mode="r:*") as tar:
                for member in tar:
                    name = member.name.removeprefix("./").lstrip("/")
                    if name in missing and member.isfile():
                        handle = tar.extractfile(member)
                        found[name] = handle.read() if handle else b""
        except (tarfile.TarError, OSError):
            continue
    return found


def resolve_user(services: Services, info: ImageInfo, user: str) -> str:
    """USER[:GROUP] (names or numbers) as numeric "uid:gid", through the image's passwd/group."""
    if not user:
        return ""
    name, _, group = user.partition(":")
    if name.isdigit() and group.isdigit():
        return f"{name}:{group}"
    files = _layer_files(services, info.layers, ("etc/passwd", "etc/group"))

    def table(path: str) -> list[list[str]]:
        text = files.get(path, b"").decode(errors="replace")
        return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]

    uid = gid = None
    for entry in table("etc/passwd"):
        if len(entry) >= 4 and (entry[0] == name or entry[2] == name):
            uid, gid = entry[2], entry[3]
            break
    if uid is None:
        if not name.isdigit():
            raise CLIError(f"unable to find user {name}: no matching entries in passwd file")
        uid, gid = name, "0"
    if group:
        gid = None
        for entry in table("etc/group"):
            if len(entry) >= 3 and (entry[0] == group or entry[2] == group):
                gid = entry[2]
                break
        if gid is None:
            if not group.isdigit():
                raise CLIError(f"unable to find group {group}: no matching entries in group file")
            gid = group
    return f"{uid}:{gid}"


# -- the container -----------------------------------------------------------------------------


def default_snapshotter(ctx: Context) -> str:
    with contextlib.suppress(Exception):
        label = ctx.client.get_namespace(ctx.namespace).labels.get("containerd.io/defaults/snapshotter")
        if label:
            return label
    return "overlayfs"


def log_dir(ctx: Context) -> str:
    """The directory the daemon keeps detached processes' logs in (its task plugin says)."""
    plugins = ctx.client.plugins([f"type=={TASK_PLUGIN[0]},id=={TASK_PLUGIN[1]}"])
    directory = plugins[0].exports.get("log_dir", "") if plugins else ""
    if not directory:
        raise CLIError("the daemon does not say where logs go: give --log-uri or --null-io")
    return directory


def log_uri_for(ctx: Context, name: str, terminal: bool) -> str:
    """JSON lines (docker's json-file records) unless the process has a terminal (raw text)."""
    path = f"{log_dir(ctx)}/{ctx.namespace}/{name}.log"
    return f"file://{path}" if terminal else f"file://{path}?format=jsonl"


def attached_log(container: Any) -> LogCopy | None:
    """Where an attached process's output is also kept, so that `logs` shows it later."""
    path = log_path_of(container)
    if not path:
        return None
    try:
        return LogCopy(path, jsonl="format=jsonl" in container.labels.get(LABEL_LOG_URI, ""))
    except OSError:
        return None  # not on the daemon's host, or not root: the run goes on without


def log_path_of(container: Any) -> str:
    from urllib.parse import unquote, urlsplit

    uri = container.labels.get(LABEL_LOG_URI, "")
    return unquote(urlsplit(uri).path) if uri.startswith("file://") else ""


def now_rfc3339() -> str:
    ns = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"


def build_spec(
    ctx: Context, services: Services, args: argparse.Namespace, plan: Plan, info: ImageInfo, name: str
) -> tuple[dict[str, Any], list[str], list[str]]:
    """(spec, entrypoint, cmd) for the container."""
    from runtimed.tasks import spec as specs

    config = dict(info.config)
    if args.entrypoint is not None:
        config["Entrypoint"] = [args.entrypoint] if args.entrypoint else []
        config["Cmd"] = []
    entrypoint = list(config.get("Entrypoint") or [])
    cmd = list(args.command) if args.command else list(config.get("Cmd") or [])
    spec = specs.default_spec(ctx.namespace, name, seccomp=not args.no_seccomp)
    user = resolve_user(services, info, args.user or config.get("User") or "")
    try:
        specs.with_image_config(
            spec, config, args.command, terminal=args.tty, env=plan.env, cwd=args.workdir, user=user
        )
    except Exception as exc:
        message = getattr(exc, "message", None)
        if message is None:
            raise
        raise CLIError(message) from None
    spec["hostname"] = args.hostname or name[:12]
    resources = spec["linux"].setdefault("resources", {})
    if plan.memory:
        resources["memory"] = {"limit": plan.memory}
    if plan.cpus:
        resources["cpu"] = {"quota": int(plan.cpus * CPU_PERIOD), "period": CPU_PERIOD}
    if args.pids_limit > 0:
        resources["pids"] = {"limit": args.pids_limit}
    return spec, entrypoint, cmd


def _prepare_volumes(
    ctx: Context, plan: Plan, snapshotter: str, name: str, services: Services, created: list[str]
) -> list[dict[str, Any]]:
    """Mount records for the spec and the label; creates (and seeds) new named volumes."""
    records = []
    for mount in plan.mounts:
        if mount.kind == "bind":
            if not os.path.exists(mount.source):
                os.makedirs(mount.source, mode=0o755, exist_ok=True)  # as docker does
            records.append(
                {
                    "type": "bind",
                    "source": mount.source,
                    "destination": mount.destination,
                    "mode": "ro" if mount.readonly else "rw",
                    "rw": not mount.readonly,
                }
            )
            continue
        pb, stub = volumes_stub(ctx)
        new = False
        try:
            volume = stub.Get(
                pb.GetVolumeRequest(name=mount.source), metadata=services.md, timeout=ctx.timeout
            ).volume
        except Exception as exc:
            if is_code(exc, "UNIMPLEMENTED"):
                raise CLIError("named volumes need the daemon's Volumes service, which it lacks") from None
            if not is_code(exc, "NOT_FOUND"):
                raise
            volume = stub.Create(
                pb.CreateVolumeRequest(name=mount.source), metadata=services.md, timeout=ctx.timeout
            ).volume
            created.append(mount.source)
            new = True
        if new:
            rootfs = services.mounts(snapshotter, name)
            stub.Seed(
                pb.SeedVolumeRequest(name=mount.source, rootfs=rootfs, path=mount.destination),
                metadata=services.md,
                timeout=max(ctx.timeout, 300),
            )
        records.append(
            {
                "type": "volume",
                "name": mount.source,
                "source": volume.mountpoint,
                "destination": mount.destination,
                "mode": "ro" if mount.readonly else "rw",
                "rw": not mount.readonly,
            }
        )
    return records


def remove_volumes(ctx: Context, names: Sequence[str]) -> None:
    if not names:
        return
    pb, stub = volumes_stub(ctx)
    for name in names:
        with contextlib.suppress(Exception):
            stub.Remove(
                pb.RemoveVolumeRequest(name=name),
                metadata=[(NAMESPACE_KEY, ctx.namespace)],
                timeout=ctx.timeout,
            )


def create_container(ctx: Context, services: Services, args: argparse.Namespace, plan: Plan) -> Any:
    """Pull if needed, then snapshot + volumes + Containers.Create; returns the container."""
    snapshotter = args.snapshotter or default_snapshotter(ctx)
    image = find_or_pull(ctx, args.image, snapshotter, args.plain_http)
    info = image_info(services, image)
    try:
        services.snapshots.Stat(
            services.snapshots_pb.StatSnapshotRequest(snapshotter=snapshotter, key=info.chain),
            metadata=services.md,
        )
    except Exception as exc:
        if not is_code(exc, "NOT_FOUND"):
            raise
        raise CLIError(
            f"image {args.image} is not unpacked in snapshotter {snapshotter}: pull it again with "
            f"--snapshotter {snapshotter}"
        ) from None
    # Under a lease, as ctr does: the snapshot is not garbage until the container holds it.
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    lease = services.leases.Create(
        services.leases_pb.CreateRequest(labels={"containerd.io/gc.expire": expires}), metadata=services.md
    ).lease
    leased = [*services.md, (LEASE_KEY, lease.id)]
    try:
        for attempt in range(20):
            name = plan.name or generate_name()
            try:
                services.snapshots.Prepare(
                    services.snapshots_pb.PrepareSnapshotRequest(
                        snapshotter=snapshotter, key=name, parent=info.chain
                    ),
                    metadata=leased,
                )
            except Exception as exc:
                if is_code(exc, "ALREADY_EXISTS"):
                    if not plan.name and attempt < 19:
                        continue
                    raise CLIError(f"the container name {name!r} is already in use") from None
                raise
            try:
                return _create_record(ctx, services, args, plan, info, image, name, snapshotter, leased)
            except Exception as exc:
                with contextlib.suppress(Exception):
                    services.snapshots.Remove(
                        services.snapshots_pb.RemoveSnapshotRequest(snapshotter=snapshotter, key=name),
                        metadata=services.md,
                    )
                if is_code(exc, "ALREADY_EXISTS"):
                    if not plan.name and attempt < 19:
                        continue
                    raise CLIError(f"the container name {name!r} is already in use") from None
                raise
        raise CLIError("could not find a free container name")
    finally:
        with contextlib.suppress(Exception):
            services.leases.Delete(services.leases_pb.DeleteRequest(id=lease.id), metadata=services.md)


def _create_record(
    ctx: Context,
    services: Services,
    args: argparse.Namespace,
    plan: Plan,
    info: ImageInfo,
    image: Any,
    name: str,
    snapshotter: str,
    leased: list[tuple[str, str]],
) -> Any:
    from google.protobuf import any_pb2

    from runtimed.tasks import spec as specs

    spec, entrypoint, cmd = build_spec(ctx, services, args, plan, info, name)
    created_volumes = plan.created_volumes
    try:
        mounts = _prepare_volumes(ctx, plan, snapshotter, name, services, created_volumes)
        for mount in mounts:
            spec["mounts"].append(
                {
                    "destination": mount["destination"],
                    "type": "bind",
                    "source": mount["source"],
                    "options": ["rbind", "rprivate", "ro" if not mount["rw"] else "rw"],
                }
            )
        labels = dict(plan.labels)
        labels.setdefault(STOP_SIGNAL_LABEL, info.config.get("StopSignal") or "SIGTERM")
        labels[LABEL_ENTRYPOINT] = json.dumps(entrypoint)
        labels[LABEL_CMD] = json.dumps(cmd)
        if mounts:
            labels[LABEL_MOUNTS] = json.dumps(mounts)
        if not args.null_io:
            labels[LABEL_LOG_URI] = args.log_uri or log_uri_for(ctx, name, args.tty)
        container = services.containers_pb.Container(
            id=name,
            labels=labels,
            image=image.name,
            runtime=services.containers_pb.Container.Runtime(name=args.runtime),
            spec=any_pb2.Any(type_url=SPEC_TYPE_URL, value=specs.encode(spec)),
            snapshotter=snapshotter,
            snapshot_key=name,
        )
        request = services.containers_pb.CreateContainerRequest(container=container)
        created = services.containers.Create(request, metadata=leased, timeout=ctx.timeout).container
    except BaseException:
        remove_volumes(ctx, created_volumes)
        created_volumes.clear()
        raise
    if not args.log_uri and LABEL_LOG_URI in labels:  # a new container starts a new log
        with contextlib.suppress(FileNotFoundError):
            os.unlink(log_path_of(created))
    return created


def remove_container(ctx: Context, services: Services, container_id: str) -> None:
    """Container record, its snapshot and its log file (the task must be gone)."""
    container = services.containers.Get(
        services.containers_pb.GetContainerRequest(id=container_id), metadata=services.md
    ).container
    services.containers.Delete(
        services.containers_pb.DeleteContainerRequest(id=container_id), metadata=services.md
    )
    if container.snapshot_key:
        with contextlib.suppress(Exception):
            services.snapshots.Remove(
                services.snapshots_pb.RemoveSnapshotRequest(
                    snapshotter=container.snapshotter, key=container.snapshot_key
                ),
                metadata=services.md,
            )
    path = log_path_of(container)
    if path and path.endswith(f"/{ctx.namespace}/{container_id}.log"):
        with contextlib.suppress(Exception):  # the daemon's log of it, not a --log-uri of the user's
            if path == f"{log_dir(ctx)}/{ctx.namespace}/{container_id}.log":
                os.unlink(path)


# -- the task ----------------------------------------------------------------------------------


class InvokeError(CLIError):
    """The command could not be run: exit status 126 or 127, as docker's."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def invoke_status(message: str) -> int:
    """docker's exit code for a failed task create/start: 127 not found, 126 cannot invoke, else 125."""
    text = message.lower()
    if "executable file not found" in text or "no such file or directory" in text:
        return NOT_FOUND
    if "permission denied" in text or "is a directory" in text or "exec format error" in text:
        return CANNOT_INVOKE
    return ERROR_EXIT


def task_failure(exc: BaseException, ctx: Context) -> CLIError | None:
    """A CLIError (an InvokeError for 126/127) for a failed Create/Start of a task; None if unknown."""
    from runtimed.cli.common import error_message

    message = error_message(exc, ctx)
    if message is None:
        return None
    status = invoke_status(message) if "exec" in message.lower() or "runc" in message.lower() else ERROR_EXIT
    if status != ERROR_EXIT:
        return InvokeError(message, status)
    return CLIError(message)


def create_task(
    ctx: Context,
    services: Services,
    stubs: Stubs,
    container: Any,
    *,
    attachment: Attachment | None,
    null_io: bool = False,
) -> None:
    """Tasks.Create with the container's rootfs; detached output goes to the container's log."""
    spec = json.loads(container.spec.value or b"{}")
    terminal = bool((spec.get("process") or {}).get("terminal"))
    request = stubs.pb.CreateTaskRequest(
        container_id=container.id,
        rootfs=services.mounts(container.snapshotter, container.snapshot_key),
        terminal=terminal,
    )
    if attachment is not None:
        request.stdin, request.stdout, request.stderr = attachment.stdin, attachment.stdout, attachment.stderr
    elif not null_io:
        uri = container.labels.get(LABEL_LOG_URI, "")
        if uri:
            request.stdout = uri
            request.stderr = "" if terminal else uri
    try:
        stubs.call("Create", request, timeout=max(ctx.timeout, 60))
    except Exception as exc:
        failure = task_failure(exc, ctx)
        if failure is None:
            raise
        raise failure from None


def start_task(services: Services, stubs: Stubs, container_id: str) -> None:
    stubs.call("Start", stubs.pb.StartRequest(container_id=container_id))
    with contextlib.suppress(Exception):
        services.update_labels(
            container_id,
            {LABEL_STARTED: now_rfc3339(), LABEL_FINISHED: "", LABEL_EXIT_CODE: "", LABEL_ERROR: ""},
        )


def record_exit(services: Services, container_id: str, status: int, error: str = "") -> None:
    with contextlib.suppress(Exception):
        services.update_labels(
            container_id,
            {LABEL_FINISHED: now_rfc3339(), LABEL_EXIT_CODE: str(status), LABEL_ERROR: error[:1000]},
        )


def delete_task_quietly(stubs: Stubs, container_id: str) -> None:
    with contextlib.suppress(Exception):
        stubs.call("Delete", stubs.pb.DeleteTaskRequest(container_id=container_id))


def create_only(ctx: Context, args: argparse.Namespace) -> int:
    plan = make_plan(args)
    services = Services(ctx)
    container = create_container(ctx, services, args, plan)
    print(container.id)
    return 0


def run_container(ctx: Context, args: argparse.Namespace) -> int:
    try:
        return _run(ctx, args)
    except InvokeError as exc:
        sys.stdout.flush()
        report(str(exc))
        return exc.status


def _run(ctx: Context, args: argparse.Namespace) -> int:
    plan = make_plan(args)
    if args.rm:
        plan.labels[LABEL_AUTO_REMOVE] = "true"
    services = Services(ctx)
    stubs = Stubs(ctx)
    container = create_container(ctx, services, args, plan)
    name = container.id
    attachment: Attachment | None = None
    detached = args.detach
    try:
        if not detached and not args.null_io:
            log = None if args.rm else attached_log(container)
            attachment = Attachment(
                name, stdin=args.interactive or args.tty, terminal=args.tty, log=log, gated=True
            )
        try:
            create_task(ctx, services, stubs, container, attachment=attachment, null_io=args.null_io)
            if attachment is not None:
                attachment.open_gate()  # from here on, output is the process's
        except InvokeError as exc:
            if not args.rm:
                record_exit(services, name, exc.status, str(exc))
            raise
        except BaseException:
            if not args.rm:  # not the command's fault: leave nothing behind
                with contextlib.suppress(Exception):
                    remove_container(ctx, services, name)
                remove_volumes(ctx, plan.created_volumes)
            raise
        if detached:
            try:
                start_task(services, stubs, name)
            except Exception as exc:
                failure = task_failure(exc, ctx)
                delete_task_quietly(stubs, name)
                if failure is None:
                    raise
                record_exit(services, name, getattr(failure, "status", ERROR_EXIT), str(failure))
                raise failure from None
            if args.rm:
                spawn_auto_remove(ctx, name)
            print(name)
            return 0
        waiter = stubs.wait_future(name)
        with raw_terminal(args.tty), forwarding_signals(stubs, name, "", args.tty):
            start_task(services, stubs, name)
            if args.tty:
                resize(stubs, name)
            status = wait_exit(waiter)
            if attachment is not None:
                attachment.wait_output()
        if not args.rm:
            record_exit(services, name, status)
        stubs.call("Delete", stubs.pb.DeleteTaskRequest(container_id=name))
    except BaseException as exc:
        if args.rm:
            delete_task_quietly(stubs, name)
            with contextlib.suppress(Exception):
                remove_container(ctx, services, name)
            if not isinstance(exc, InvokeError):  # runtimectl's or the daemon's failure: no new volumes
                remove_volumes(ctx, plan.created_volumes)
        raise
    finally:
        if attachment is not None:
            attachment.close()
    if args.rm:
        remove_container(ctx, services, name)
    return status


# -- run -d --rm ------------------------------------------------------------------------------


def spawn_auto_remove(ctx: Context, name: str) -> None:
    """A watcher in its own session that outlives this command: it removes the container (task,
    record, snapshot, log) once the task ends, as docker's daemon does for `run -d --rm`."""
    import subprocess

    argv = [sys.executable, "-m", "runtimed.cli.main", "-a", ctx.address, "-n", ctx.namespace]
    subprocess.Popen(
        [*argv, "--timeout", str(ctx.timeout), "_autoremove", name],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def auto_remove(ctx: Context, args: argparse.Namespace) -> int:
    """Wait for the task to end (riding out daemon restarts), then remove the container."""
    services, stubs = Services(ctx), Stubs(ctx)
    unavailable_since: float | None = None
    while True:
        try:
            container = services.containers.Get(
                services.containers_pb.GetContainerRequest(id=args.name), metadata=services.md
            ).container
            unavailable_since = None
            if container.labels.get(LABEL_AUTO_REMOVE) != "true":
                return 0  # a different container of the same name
            try:
                waiter = stubs.wait_future(args.name)
                wait_exit(waiter)
            except Exception as exc:
                if not is_code(exc, "NOT_FOUND"):
                    raise
            delete_task_quietly(stubs, args.name)
            remove_container(ctx, services, args.name)
            return 0
        except Exception as exc:
            if is_code(exc, "NOT_FOUND"):
                return 0  # removed already
            if not (is_code(exc, "UNAVAILABLE") or is_code(exc, "CANCELLED")):
                return ERROR_EXIT
            now = time.monotonic()
            unavailable_since = unavailable_since or now
            if now - unavailable_since > AUTO_REMOVE_GIVE_UP:
                return ERROR_EXIT
            time.sleep(1)
