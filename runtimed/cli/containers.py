"""`runtimectl containers ls|info|rm`: container metadata (tasks, run and exec come later)."""

from __future__ import annotations

import argparse
from typing import Any

from runtimed.cli.common import Context, for_each, group
from runtimed.cli.output import add_format_options, ago, any_dict, message_dict, print_json, render


def register(subparsers: argparse._SubParsersAction) -> None:
    commands = group(subparsers, "containers", "manage containers", aliases=("container", "c"))

    ls = commands.add_parser(
        "ls",
        aliases=["list"],
        help="list containers",
        description="List containers, optionally matching containerd filters (e.g. labels.app==web).",
    )
    ls.add_argument("filters", metavar="FILTER", nargs="*")
    add_format_options(ls, quiet="container IDs")
    ls.set_defaults(func=list_containers)

    info = commands.add_parser(
        "info",
        aliases=["inspect"],
        help="show a container as JSON",
        description="Show a container as JSON, its OCI spec decoded.",
    )
    info.add_argument("id", metavar="ID")
    info.set_defaults(func=container_info)

    rm = commands.add_parser(
        "rm", aliases=["remove", "delete"], help="remove containers", description="Remove containers."
    )
    rm.add_argument("ids", metavar="ID", nargs="+")
    rm.set_defaults(func=remove_containers)


def container_dict(container: Any) -> dict[str, Any]:
    """The container as JSON data, its Any fields (spec, runtime options, extensions) decoded."""
    plain = type(container)()
    plain.CopyFrom(container)
    plain.ClearField("spec")
    plain.runtime.ClearField("options")
    plain.ClearField("extensions")
    data = message_dict(plain)
    if container.runtime.HasField("options"):
        data["runtime"]["options"] = any_dict(container.runtime.options)
    data["spec"] = any_dict(container.spec) if container.HasField("spec") else None
    data["extensions"] = {k: any_dict(v) for k, v in sorted(container.extensions.items())}
    return {f.name: data[f.name] for f in container.DESCRIPTOR.fields if f.name in data}


def list_containers(ctx: Context, args: argparse.Namespace) -> None:
    found = sorted(ctx.client.containers(args.filters), key=lambda c: c.id)
    render(
        args,
        found,
        ("CONTAINER", "IMAGE", "RUNTIME", "CREATED"),
        lambda c: (c.id, c.image or "-", c.runtime.name, ago(c)),
        container_dict,
        lambda c: c.id,
    )


def container_info(ctx: Context, args: argparse.Namespace) -> None:
    print_json(container_dict(ctx.client.container(args.id)))


def remove_containers(ctx: Context, args: argparse.Namespace) -> int:
    return for_each(ctx, args.ids, ctx.client.delete_container)
