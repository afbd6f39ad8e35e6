"""`runtimectl build [-t NAME:TAG ...] [-f Dockerfile] [--build-arg K=V] [--no-cache] CONTEXT`.

The builder (runtimed.build) runs here, in the client, through the daemon's API: RUN steps are
containers of the daemon's Tasks service (runtime --runtime, default runc); COPY and ADD mount
the step's snapshot locally, so building needs root on the daemon's host, as `ctr` does for
mounts. `runtimectl builder prune` (or `runtimectl build prune`) drops the build cache.

Exit status: 0 built; 1 a step failed (a RUN exited non-zero — its output was shown, then
"The command '...' returned a non-zero code: N" — or a COPY source is missing, a user unknown);
125 the Dockerfile does not parse (unknown instruction: the line is named), a bad option, or an
error of the daemon or of runtimectl; 130 interrupted. A failed build leaves no image, no
container, no task, no mount and no snapshot other than the cached steps that did succeed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from runtimed.cli.common import CLIError, Context, report

DEFAULT_RUNTIME = "io.containerd.runc.v2"
BUILD_FAILED_EXIT = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    build = subparsers.add_parser(
        "build",
        help="build an image from a Dockerfile",
        description="Build an image from a Dockerfile and a context directory, like the classic "
        "`docker build`. Steps run through the daemon (RUN in a container of --runtime); unchanged "
        "steps come from the build cache. `build prune` drops the cache.",
    )
    build.add_argument(
        "-t", "--tag", action="append", default=[], metavar="NAME[:TAG]", help="name the image (repeatable)"
    )
    build.add_argument(
        "-f", "--file", default="", help="the Dockerfile (default: CONTEXT/Dockerfile; - for stdin)"
    )
    build.add_argument(
        "--build-arg",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="set a build argument (NAME alone takes it from the environment)",
    )
    build.add_argument("--no-cache", action="store_true", help="do not use the build cache")
    build.add_argument(
        "--runtime", default=DEFAULT_RUNTIME, help=f"runtime of RUN steps (default {DEFAULT_RUNTIME})"
    )
    build.add_argument(
        "--snapshotter", default="", help="snapshotter (default: the namespace's, else overlayfs)"
    )
    build.add_argument(
        "--network", choices=("host", "none"), default="host", help="RUN steps' network (default: host)"
    )
    build.add_argument("--target", default="", help="build this stage (FROM ... AS NAME) and stop")
    build.add_argument(
        "--progress", choices=("auto", "plain"), default="auto", help="output style (both print every step)"
    )
    build.add_argument("-q", "--quiet", action="store_true", help="print only the image ID")
    build.add_argument(
        "context", metavar="CONTEXT", help="the build context directory ('prune': drop the cache)"
    )
    build.set_defaults(func=build_command)

    builder = subparsers.add_parser(
        "builder", help="manage the build cache", description="Manage the build cache."
    )
    builder.set_defaults(func=lambda ctx, args: builder.print_help())
    actions = builder.add_subparsers(title="commands", metavar="COMMAND")
    prune = actions.add_parser(
        "prune",
        help="remove the build cache",
        description="Remove every build cache record of the namespace.",
    )
    prune.add_argument("-f", "--force", action="store_true", help="do not ask (accepted for docker's sake)")
    prune.set_defaults(func=prune_command)


def default_snapshotter(ctx: Context) -> str:
    with contextlib.suppress(Exception):
        label = ctx.client.get_namespace(ctx.namespace).labels.get("containerd.io/defaults/snapshotter")
        if label:
            return label
    return "overlayfs"


def build_args(texts: list[str]) -> dict[str, str]:
    values = {}
    for text in texts:
        name, sep, value = text.partition("=")
        if not name:
            raise CLIError(f"invalid --build-arg {text!r}: expected NAME[=VALUE]")
        if sep:
            values[name] = value
        elif name in os.environ:
            values[name] = os.environ[name]
    return values


def prune_command(ctx: Context, args: argparse.Namespace) -> None:
    from runtimed.build.api import Daemon
    from runtimed.build.cache import BuildCache

    daemon = Daemon(ctx.client.channel, ctx.namespace, ctx.timeout)
    count = BuildCache(daemon, "").prune()
    daemon.collect_garbage()
    print(f"Deleted {count} build cache record{'s' if count != 1 else ''}")


def build_command(ctx: Context, args: argparse.Namespace) -> int:
    from runtimed.build import executor
    from runtimed.build.api import Daemon
    from runtimed.build.rootfs import BuildStepError
    from runtimed.errors import RuntimedError

    context = Path(args.context)
    if args.context == "prune" and not context.is_dir():
        prune_command(ctx, args)
        return 0
    if not context.is_dir():
        raise CLIError(f"unable to prepare context: path {args.context!r} not found or not a directory")
    if os.geteuid() != 0:
        raise CLIError("runtimectl build needs root: COPY and ADD mount snapshots on this host")
    dockerfile = Path(args.file) if args.file else context / "Dockerfile"
    try:
        text = sys.stdin.read() if args.file == "-" else dockerfile.read_text()
    except OSError as exc:
        raise CLIError(f"unable to read the Dockerfile {str(dockerfile)!r}: {exc.strerror or exc}") from None
    for tag in args.tag:
        try:
            executor.normalised(tag)
        except RuntimedError as exc:
            raise CLIError(f"invalid tag {tag!r}: {exc.reason}") from None
    options = executor.Options(
        context=context,
        dockerfile_text=text,
        tags=list(args.tag),
        build_args=build_args(args.build_arg),
        no_cache=args.no_cache,
        runtime=args.runtime,
        snapshotter=args.snapshotter or default_snapshotter(ctx),
        network=args.network,
        target=args.target,
        quiet=args.quiet,
    )
    daemon = Daemon(ctx.client.channel, ctx.namespace, ctx.timeout)
    try:
        builder = executor.Builder(
            daemon,
            options,
            find_image=lambda name: find_image(ctx, name),
            pull=lambda name: pull(ctx, name, options),
        )
    except RuntimedError as exc:
        raise CLIError(exc.reason) from None
    try:
        result = builder.build()
    except executor.RunFailed as exc:
        sys.stdout.flush()
        print(str(exc), file=sys.stderr)
        return BUILD_FAILED_EXIT
    except (executor.StepFailed, BuildStepError) as exc:
        sys.stdout.flush()
        report(str(exc.reason if isinstance(exc, RuntimedError) else exc))
        return BUILD_FAILED_EXIT
    except RuntimedError as exc:
        raise CLIError(exc.reason) from None
    if args.quiet:
        print(result.config_digest)
        return 0
    for warning in result.warnings:
        print(warning)
    print(f"Successfully built {result.config_digest.partition(':')[2][:12]}")
    for tag in result.tags:
        print(f"Successfully tagged {tag}")
    return 0


def find_image(ctx: Context, name: str) -> Any | None:
    import grpc

    from runtimed.cli.images import find_image as find

    try:
        return find(ctx, name)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise
    except CLIError:
        return None


def pull(ctx: Context, name: str, options: Any) -> Any:
    from runtimed.build.api import Daemon
    from runtimed.cli.progress import PULL_WORDS, ProgressView

    daemon = Daemon(ctx.client.channel, ctx.namespace, ctx.timeout)
    view = ProgressView(PULL_WORDS, quiet=options.quiet)
    done = view.follow(daemon.pull(name, options.snapshotter), f"pull of {name}")
    return done.image
