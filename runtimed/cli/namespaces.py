"""`runtimectl namespace ls|create|rm|label`: the tenant boundary of every other object."""

from __future__ import annotations

import argparse

from runtimed.cli.common import Context, for_each, group, label_arg
from runtimed.cli.output import add_format_options, labels_text, message_dict, render


def register(subparsers: argparse._SubParsersAction) -> None:
    commands = group(subparsers, "namespace", "manage namespaces", aliases=("namespaces", "ns"))

    ls = commands.add_parser("ls", aliases=["list"], help="list namespaces", description="List namespaces.")
    add_format_options(ls, quiet="namespace names")
    ls.set_defaults(func=list_namespaces)

    create = commands.add_parser(
        "create", help="create a namespace", description="Create a namespace, optionally with labels."
    )
    create.add_argument("name", metavar="NAME")
    create.add_argument("labels", metavar="LABEL=VALUE", nargs="*", type=label_arg)
    create.set_defaults(func=create_namespace)

    rm = commands.add_parser(
        "rm",
        aliases=["remove", "delete"],
        help="remove namespaces",
        description="Remove namespaces; a namespace must be empty to be removed.",
    )
    rm.add_argument("names", metavar="NAME", nargs="+")
    rm.set_defaults(func=remove_namespaces)

    label = commands.add_parser(
        "label",
        help="set or remove labels of a namespace",
        description="Set labels of a namespace; KEY= removes the label KEY. Without labels, show them.",
    )
    label.add_argument("name", metavar="NAME")
    label.add_argument("labels", metavar="LABEL=VALUE", nargs="*", type=label_arg)
    label.set_defaults(func=label_namespace)


def list_namespaces(ctx: Context, args: argparse.Namespace) -> None:
    found = sorted(ctx.client.namespaces(), key=lambda n: n.name)
    render(
        args,
        found,
        ("NAME", "LABELS"),
        lambda n: (n.name, labels_text(n.labels)),
        message_dict,
        lambda n: n.name,
    )


def create_namespace(ctx: Context, args: argparse.Namespace) -> None:
    ctx.client.create_namespace(args.name, dict(args.labels))
    print(args.name)


def remove_namespaces(ctx: Context, args: argparse.Namespace) -> int:
    return for_each(ctx, args.names, ctx.client.delete_namespace)


def label_namespace(ctx: Context, args: argparse.Namespace) -> None:
    if args.labels:
        namespace = ctx.client.update_namespace_labels(args.name, dict(args.labels))
    else:
        namespace = ctx.client.get_namespace(args.name)
    for key, value in sorted(namespace.labels.items()):
        print(f"{key}={value}")
