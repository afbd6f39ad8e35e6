"""`runtimectl plugins ls`: every plugin of the daemon and whether it loaded (ok, skip, error)."""

from __future__ import annotations

import argparse
from typing import Any

from runtimed.cli.common import Context, group
from runtimed.cli.output import add_format_options, message_dict, print_json, print_table

SKIP_TEXT = "skip plugin"  # containerd's ErrSkipPlugin, which ctr shows as "skip"


def register(subparsers: argparse._SubParsersAction) -> None:
    commands = group(subparsers, "plugins", "inspect the daemon's plugins", aliases=("plugin",))
    ls = commands.add_parser(
        "ls",
        aliases=["list"],
        help="list plugins",
        description="List plugins, optionally matching filters (e.g. type==io.containerd.grpc.v1).",
    )
    ls.add_argument("filters", metavar="FILTER", nargs="*")
    ls.add_argument("-d", "--detailed", action="store_true", help="show every field, with init errors")
    add_format_options(ls)
    ls.set_defaults(func=list_plugins)


def status(plugin: Any) -> str:
    if not plugin.HasField("init_err"):
        return "ok"
    return "skip" if SKIP_TEXT in plugin.init_err.message else "error"


def platforms_text(plugin: Any) -> str:
    names = ["/".join(p for p in (x.os, x.architecture, x.variant) if p) for x in plugin.platforms]
    return ",".join(names) or "-"


def code_name(code: int) -> str:
    import grpc

    return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))


def plugin_dict(plugin: Any) -> dict[str, Any]:
    return {**message_dict(plugin), "status": status(plugin)}


def list_plugins(ctx: Context, args: argparse.Namespace) -> None:
    found = ctx.client.plugins(args.filters)
    if args.format == "json":
        print_json([plugin_dict(p) for p in found])
    elif args.detailed:
        for index, plugin in enumerate(found):
            if index:
                print()
            print_detailed(plugin)
    else:
        print_table(
            ("TYPE", "ID", "PLATFORMS", "STATUS"),
            ((p.type, p.id, platforms_text(p), status(p)) for p in found),
        )


def print_detailed(plugin: Any) -> None:
    indent = " " * 15
    print(f"{'Type:':<15}{plugin.type}")
    print(f"{'ID:':<15}{plugin.id}")
    print(f"{'Status:':<15}{status(plugin)}")
    for title, values in (
        ("Requires", list(plugin.requires)),
        ("Platforms", [platforms_text(plugin)] if plugin.platforms else []),
        ("Exports", [f"{k}={v}" for k, v in sorted(plugin.exports.items())]),
        ("Capabilities", list(plugin.capabilities)),
    ):
        if values:
            print(f"{title}:")
            for value in values:
                print(indent + value)
    if plugin.HasField("init_err"):
        print("Error:")
        print(f"{indent}{'Code:':<10}{code_name(plugin.init_err.code)}")
        print(f"{indent}{'Message:':<10}{plugin.init_err.message}")
