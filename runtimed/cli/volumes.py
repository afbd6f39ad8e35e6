"""`runtimectl volume [create|ls|inspect|rm|prune]`: named volumes (runtimed's Volumes service).

A volume is a directory under the daemon's root that outlives containers; a container uses one by
bind-mounting its mountpoint (`runtimectl run -v NAME:/path`). Filters are containerd's syntax
(`name==data`, `labels."app"==web`), and docker's `label=KEY`, `label=KEY=VALUE`, `label!=KEY=VALUE` and
`name=PART` forms are translated.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from runtimed.cli.common import (
    ERROR_EXIT,
    CLIError,
    Context,
    error_message,
    for_each,
    group,
    label_arg,
    report,
)
from runtimed.cli.output import (
    add_format_options,
    ago,
    human_size,
    labels_text,
    message_dict,
    print_json,
    render,
)

PRUNE_WARNING = "WARNING! This will remove all volumes not used by at least one container."


def register(subparsers: argparse._SubParsersAction) -> None:
    commands = group(subparsers, "volume", "manage volumes", aliases=("volumes",))

    create = commands.add_parser(
        "create",
        help="create a volume",
        description="Create a volume and print its name; without NAME the daemon makes up a 64-hex one.",
    )
    create.add_argument("name", metavar="NAME", nargs="?", default="")
    create.add_argument(
        "--label", dest="labels", metavar="KEY=VALUE", type=label_arg, action="append", default=[],
        help="set a label (repeatable)",
    )  # fmt: skip
    create.set_defaults(func=create_volume)

    ls = commands.add_parser(
        "ls",
        aliases=["list"],
        help="list volumes",
        description='List volumes. Filters: containerd\'s syntax (name==data, labels."app"==web) or '
        "docker's label=KEY[=VALUE], label!=KEY=VALUE, name=PART; several filters match any of them.",
    )
    add_filter_option(ls)
    add_format_options(ls, quiet="volume names")
    ls.set_defaults(func=list_volumes)

    inspect = commands.add_parser(
        "inspect",
        help="show volumes as JSON",
        description="Show volumes as a JSON array in docker's form, plus the containers using each.",
    )
    inspect.add_argument("names", metavar="NAME", nargs="+")
    inspect.set_defaults(func=inspect_volumes)

    rm = commands.add_parser(
        "rm",
        aliases=["remove"],
        help="remove volumes",
        description="Remove volumes and their data; a volume a container still mounts is refused.",
    )
    rm.add_argument("names", metavar="NAME", nargs="+")
    rm.add_argument("-f", "--force", action="store_true", help="no error for volumes that do not exist")
    rm.set_defaults(func=remove_volumes)

    prune = commands.add_parser(
        "prune",
        help="remove unused volumes",
        description="Remove every volume no container uses (that matches the filters), with its data.",
    )
    prune.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
    add_filter_option(prune)
    prune.set_defaults(func=prune_volumes)


def add_filter_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--filter", dest="filters", metavar="FILTER", action="append", default=[],
        help="only volumes matching FILTER (repeatable: any may match)",
    )  # fmt: skip


# -- calls ------------------------------------------------------------------------------------------


def stub(ctx: Context) -> Any:
    from runtimed.api.runtimed.services.volumes.v1 import volumes_pb2_grpc

    return volumes_pb2_grpc.VolumesStub(ctx.client.channel)


def get_volume(ctx: Context, name: str) -> Any:
    from runtimed.api.runtimed.services.volumes.v1 import volumes_pb2 as pb

    return ctx.client.call(stub(ctx).Get, pb.GetVolumeRequest(name=name)).volume


def quoted(value: str) -> str:
    """A filter value as a quoted string (Go's escapes, which JSON's are a subset of)."""
    return json.dumps(value, ensure_ascii=False)


def containerd_filter(text: str) -> str:
    """docker's label=KEY[=VALUE], label!=KEY=VALUE and name=PART; anything else as given."""
    for prefix, equal in (("label=", True), ("label!=", False)):
        if text.startswith(prefix) and not text.startswith("label=="):
            key, sep, value = text[len(prefix) :].partition("=")
            if not key or (not equal and not sep):
                expected = f"{prefix}KEY or {prefix}KEY=VALUE" if equal else f"{prefix}KEY=VALUE"
                raise CLIError(f"invalid filter {text!r}: expected {expected}")
            field = f"labels.{quoted(key)}"
            if not sep:
                return field
            return f"{field}{'==' if equal else '!='}{quoted(value)}"
    if text.startswith("name=") and not text.startswith("name=="):
        import re

        return f"name~={quoted(re.escape(text[len('name=') :]))}"
    return text


def filters_of(args: argparse.Namespace) -> list[str]:
    return [containerd_filter(f) for f in args.filters]


# -- commands -----------------------------------------------------------------------------------------


def create_volume(ctx: Context, args: argparse.Namespace) -> None:
    from runtimed.api.runtimed.services.volumes.v1 import volumes_pb2 as pb

    request = pb.CreateVolumeRequest(name=args.name, labels=dict(args.labels))
    print(ctx.client.call(stub(ctx).Create, request).volume.name)


def list_volumes(ctx: Context, args: argparse.Namespace) -> None:
    from runtimed.api.runtimed.services.volumes.v1 import volumes_pb2 as pb

    found = ctx.client.call(stub(ctx).List, pb.ListVolumesRequest(filters=filters_of(args))).volumes
    render(
        args,
        list(found),
        ("VOLUME NAME", "CREATED", "USED BY", "LABELS"),
        lambda v: (v.name, ago(v), ",".join(v.used_by) or "-", labels_text(v.labels)),
        message_dict,
        lambda v: v.name,
    )


def rfc3339(stamp: Any) -> str:
    moment = datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def docker_dict(volume: Any) -> dict[str, Any]:
    """docker volume inspect's shape, plus the containers that use the volume."""
    return {
        "CreatedAt": rfc3339(volume.created_at) if volume.HasField("created_at") else "",
        "Driver": "local",
        "Labels": dict(sorted(volume.labels.items())),
        "Mountpoint": volume.mountpoint,
        "Name": volume.name,
        "Options": {},
        "Scope": "local",
        "UsedBy": list(volume.used_by),
    }


def inspect_volumes(ctx: Context, args: argparse.Namespace) -> int:
    found, status = [], 0
    errors = []
    for name in args.names:
        try:
            found.append(docker_dict(get_volume(ctx, name)))
        except Exception as exc:
            message = error_message(exc, ctx)
            if message is None:
                raise
            errors.append(message)
            status = ERROR_EXIT
            if message.startswith(("cannot connect", "permission denied")):
                break
    if found or not errors:
        print_json(found)
    for message in errors:
        report(message)
    return status


def remove_volumes(ctx: Context, args: argparse.Namespace) -> int:
    import grpc

    from runtimed.api.runtimed.services.volumes.v1 import volumes_pb2 as pb

    def remove(name: str) -> None:
        try:
            ctx.client.call(stub(ctx).Remove, pb.RemoveVolumeRequest(name=name))
        except grpc.RpcError as exc:
            if not (args.force and exc.code() == grpc.StatusCode.NOT_FOUND):
                raise

    return for_each(ctx, args.names, remove)


def confirmed(question: str) -> bool:
    sys.stdout.write(f"{question} [y/N] ")
    sys.stdout.flush()
    answer = sys.stdin.readline()
    if not answer.endswith("\n"):
        sys.stdout.write("\n")
    return answer.strip().lower() in ("y", "yes")


def prune_volumes(ctx: Context, args: argparse.Namespace) -> None:
    from runtimed.api.runtimed.services.volumes.v1 import volumes_pb2 as pb

    filters = filters_of(args)  # a bad filter fails before the question
    if not args.force:
        print(PRUNE_WARNING)
        if not confirmed("Are you sure you want to continue?"):
            return
    pruned = ctx.client.call(stub(ctx).Prune, pb.PruneVolumesRequest(filters=filters))
    if pruned.removed:
        print("Deleted Volumes:")
        for name in pruned.removed:
            print(name)
        print()
    print(f"Total reclaimed space: {human_size(pruned.reclaimed_bytes)}")
