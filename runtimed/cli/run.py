"""`runtimectl run [-d] [--rm] [-t] [-i] IMAGE ID [CMD...]`: create a container and run its task.

Pull-free: the image must be in the namespace and unpacked. The spec is built from the image's
config as ctr builds it (runtimed.tasks.spec): Entrypoint/Cmd (or CMD), Env, WorkingDir, User,
the default capabilities, masked and read-only paths, no_new_privileges and a default seccomp
profile. Attached, runtimectl copies the process's stdio and exits with its exit status; with -d
it prints the ID and the process writes to a log file the daemon keeps (see --log-uri).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any

from runtimed.cli.common import CLIError, Context
from runtimed.cli.tasks import (
    Attachment,
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


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser(
        "run",
        help="run a command in a new container",
        description="Create a container from an image (already pulled and unpacked) and run it.",
    )
    run.add_argument("-d", "--detach", action="store_true", help="run in the background; print the ID")
    run.add_argument("--rm", action="store_true", help="remove the container when it exits")
    run.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    run.add_argument("-i", "--interactive", action="store_true", help="connect stdin")
    run.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE", help="set a variable")
    run.add_argument("-w", "--cwd", default="", help="working directory in the container")
    run.add_argument("-u", "--user", default="", help="uid[:gid] to run as")
    run.add_argument("--runtime", default=DEFAULT_RUNTIME, help=f"runtime name (default {DEFAULT_RUNTIME})")
    run.add_argument(
        "--snapshotter", default="", help="snapshotter (default: the namespace's, else overlayfs)"
    )
    run.add_argument("--log-uri", default="", help="where a detached process writes (file:///PATH)")
    run.add_argument("--null-io", action="store_true", help="send the process's output nowhere")
    run.add_argument("--no-seccomp", action="store_true", help="run without the default seccomp profile")
    run.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="container label")
    run.add_argument("image", metavar="IMAGE")
    run.add_argument("id", metavar="ID")
    run.add_argument("command", metavar="CMD", nargs=argparse.REMAINDER)
    run.set_defaults(func=run_container)


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


def image_config(services: Services, image: Any) -> tuple[dict[str, Any], str]:
    """(the image config's "config" object, the top layer's chainID) for this host's platform."""
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
    return config.config, manifests.chain_ids(config.diff_ids)[-1]


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


def create_container(ctx: Context, services: Services, args: argparse.Namespace) -> None:
    from google.protobuf import any_pb2

    from runtimed.cli.images import find_image
    from runtimed.tasks import spec as specs

    image = find_image(ctx, args.image)
    config, chain = image_config(services, image)
    snapshotter = args.snapshotter or default_snapshotter(ctx)
    try:
        services.snapshots.Stat(
            services.snapshots_pb.StatSnapshotRequest(snapshotter=snapshotter, key=chain),
            metadata=services.md,
        )
    except Exception as exc:
        raise CLIError(f"image {args.image} is not unpacked in snapshotter {snapshotter}: {exc}") from None
    spec = specs.default_spec(ctx.namespace, args.id, seccomp=not args.no_seccomp)
    specs.with_image_config(
        spec, config, args.command, terminal=args.tty, env=args.env, cwd=args.cwd, user=args.user
    )
    labels = dict(label.partition("=")[::2] for label in args.label)
    labels.setdefault("io.containerd.image.config.stop-signal", config.get("StopSignal") or "SIGTERM")
    # Under a lease, as ctr does: the snapshot is not garbage until the container holds it.
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    lease = services.leases.Create(
        services.leases_pb.CreateRequest(labels={"containerd.io/gc.expire": expires}), metadata=services.md
    ).lease
    leased = [*services.md, (LEASE_KEY, lease.id)]
    try:
        services.snapshots.Prepare(
            services.snapshots_pb.PrepareSnapshotRequest(snapshotter=snapshotter, key=args.id, parent=chain),
            metadata=leased,
        )
        container = services.containers_pb.Container(
            id=args.id,
            labels=labels,
            image=args.image,
            runtime=services.containers_pb.Container.Runtime(name=args.runtime),
            spec=any_pb2.Any(type_url=SPEC_TYPE_URL, value=specs.encode(spec)),
            snapshotter=snapshotter,
            snapshot_key=args.id,
        )
        try:
            services.containers.Create(
                services.containers_pb.CreateContainerRequest(container=container), metadata=leased
            )
        except BaseException:
            with contextlib.suppress(Exception):
                services.snapshots.Remove(
                    services.snapshots_pb.RemoveSnapshotRequest(snapshotter=snapshotter, key=args.id),
                    metadata=services.md,
                )
            raise
    finally:
        with contextlib.suppress(Exception):
            services.leases.Delete(services.leases_pb.DeleteRequest(id=lease.id), metadata=services.md)


def remove_container(services: Services, container_id: str) -> None:
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


def run_container(ctx: Context, args: argparse.Namespace) -> int:
    if args.detach and args.rm:
        raise CLIError("--rm and -d cannot be used together")
    if args.null_io and (args.tty or args.interactive):
        raise CLIError("--null-io cannot be used with -t or -i")
    services = Services(ctx)
    stubs = Stubs(ctx)
    create_container(ctx, services, args)
    attachment: Attachment | None = None
    try:
        request = stubs.pb.CreateTaskRequest(
            container_id=args.id,
            rootfs=services.snapshots.Mounts(
                services.snapshots_pb.MountsRequest(
                    snapshotter=args.snapshotter or default_snapshotter(ctx), key=args.id
                ),
                metadata=services.md,
            ).mounts,
            terminal=args.tty,
        )
        if args.detach and not args.tty and not args.interactive:
            if not args.null_io:
                uri = args.log_uri or f"file://{log_dir(ctx)}/{ctx.namespace}/{args.id}.log"
                request.stdout = request.stderr = uri
        elif not args.null_io:
            attachment = Attachment(args.id, stdin=args.interactive or args.tty, terminal=args.tty)
            request.stdin, request.stdout, request.stderr = (
                attachment.stdin,
                attachment.stdout,
                attachment.stderr,
            )
        stubs.call("Create", request)
        if args.detach:
            stubs.call("Start", stubs.pb.StartRequest(container_id=args.id))
            print(args.id)
            return 0
        waiter = stubs.wait_future(args.id)
        with raw_terminal(args.tty), forwarding_signals(stubs, args.id, "", args.tty):
            stubs.call("Start", stubs.pb.StartRequest(container_id=args.id))
            if args.tty:
                resize(stubs, args.id)
            status = wait_exit(waiter)
            if attachment is not None:
                attachment.wait_output()
        stubs.call("Delete", stubs.pb.DeleteTaskRequest(container_id=args.id))
    except BaseException:
        if args.rm:
            with contextlib.suppress(Exception):
                stubs.call("Delete", stubs.pb.DeleteTaskRequest(container_id=args.id))
            with contextlib.suppress(Exception):
                remove_container(services, args.id)
        raise
    finally:
        if attachment is not None:
            attachment.close()
    if args.rm:
        remove_container(services, args.id)
    return status
