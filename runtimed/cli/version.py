"""`runtimectl version`: the client's and the server's versions, and the server's UUID."""

from __future__ import annotations

import argparse
import platform
from typing import Any

from runtimed import __version__
from runtimed.cli.common import Context
from runtimed.cli.output import print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "version",
        help="show the client and server versions",
        description="Show the client and server versions.",
    )
    parser.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    parser.set_defaults(func=version)


def _section(title: str, values: dict[str, Any]) -> None:
    print(f"{title}:")
    width = max(len(k) for k in values) + 2
    for key, value in values.items():
        print(f"  {(key + ':').ljust(width)}{value}")


def version(ctx: Context, args: argparse.Namespace) -> None:
    import grpc

    client = {"version": __version__, "python": platform.python_version(), "grpc": grpc.__version__}
    if args.format == "text":
        _section("Client", {"Version": client["version"], "Python": client["python"], "gRPC": client["grpc"]})
        print(flush=True)  # the client part stays visible when the server cannot be reached
    reply, info = ctx.client.version(), ctx.client.server_info()
    server = {"version": reply.version, "revision": reply.revision, "uuid": info.uuid, "pid": info.pid}
    if args.format == "json":
        print_json({"client": client, "server": server})
        return
    _section(
        "Server", {"Version": reply.version, "Revision": reply.revision, "UUID": info.uuid, "PID": info.pid}
    )
    for warning in info.deprecations:
        print(f"WARNING: {warning.message} ({warning.id})")
