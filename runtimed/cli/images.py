"""`runtimectl images ls|rm`: image records (pull, push and import come later)."""

from __future__ import annotations

import argparse

from runtimed.cli.common import Context, for_each, group
from runtimed.cli.output import add_format_options, ago, human_size, labels_text, message_dict, render


def register(subparsers: argparse._SubParsersAction) -> None:
    commands = group(subparsers, "images", "manage images", aliases=("image", "i"))

    ls = commands.add_parser(
        "ls",
        aliases=["list"],
        help="list images",
        description="List images, optionally matching containerd filters (e.g. name~=busybox).",
    )
    ls.add_argument("filters", metavar="FILTER", nargs="*")
    add_format_options(ls, quiet="image references")
    ls.set_defaults(func=list_images)

    rm = commands.add_parser(
        "rm",
        aliases=["remove", "delete"],
        help="remove images",
        description="Remove image references (their content is garbage collected).",
    )
    rm.add_argument("refs", metavar="REF", nargs="+")
    rm.add_argument("--sync", action="store_true", help="wait for garbage collection")
    rm.set_defaults(func=remove_images)


def list_images(ctx: Context, args: argparse.Namespace) -> None:
    found = sorted(ctx.client.images(args.filters), key=lambda i: i.name)
    render(
        args,
        found,
        ("REF", "DIGEST", "SIZE", "MEDIA TYPE", "CREATED", "LABELS"),
        lambda i: (
            i.name,
            i.target.digest,
            human_size(i.target.size),
            i.target.media_type,
            ago(i),
            labels_text(i.labels),
        ),
        message_dict,
        lambda i: i.name,
    )


def remove_images(ctx: Context, args: argparse.Namespace) -> int:
    return for_each(ctx, args.refs, lambda ref: ctx.client.delete_image(ref, sync=args.sync))
