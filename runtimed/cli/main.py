"""runtimectl's entry point: global options, the command groups, errors and exit codes.

Exit codes follow docker: 0 success, 2 usage error (argparse), 125 an error of the daemon or the CLI.
A new command group is a module in this package with `register(subparsers)` whose parsers set
`func=handler(ctx, args) -> int | None`; add its name to COMMAND_MODULES.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from runtimed import __version__
from runtimed.cli.common import (
    ADDRESS_ENV,
    DEFAULT_ADDRESS,
    DEFAULT_NAMESPACE,
    ERROR_EXIT,
    NAMESPACE_ENV,
    PROG,
    Context,
    env_default,
    error_message,
    report,
)

COMMAND_MODULES = (
    "version",
    "namespaces",
    "plugins",
    "containers",
    "images",
    "pull",
    "push",
    "archive",
    "run",
    "tasks",
    "build",
    "lifecycle",
    "logs",
    "completion",
    "volumes",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage a runtimed (or any containerd-compatible) daemon.",
        epilog=f"Run '{PROG} COMMAND --help' for more information on a command.",
    )
    parser.add_argument(
        "-a",
        "--address",
        default=env_default(ADDRESS_ENV, DEFAULT_ADDRESS),
        help=f"daemon address, unix:///PATH or a socket path (env {ADDRESS_ENV}, default {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "-n",
        "--namespace",
        default=env_default(NAMESPACE_ENV, DEFAULT_NAMESPACE),
        help=f"namespace to work in (env {NAMESPACE_ENV}, default {DEFAULT_NAMESPACE})",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, metavar="SECONDS", help="timeout of each call (default 30)"
    )
    parser.add_argument("-v", "--version", action="version", version=f"{PROG} {__version__}")
    parser.set_defaults(func=lambda ctx, args: parser.print_help())
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"runtimed.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ctx = Context(args.address, args.namespace, args.timeout)
    try:
        return args.func(ctx, args) or 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `runtimectl ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        message = error_message(exc, ctx)
        if message is None:
            raise
        sys.stdout.flush()
        report(message)
        return ERROR_EXIT
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
