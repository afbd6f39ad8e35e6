"""What every command module shares: the call context, label arguments, error reporting."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from runtimed.wire import ADDRESS_ENV, DEFAULT_ADDRESS, DEFAULT_NAMESPACE, NAMESPACE_ENV  # noqa: F401

if TYPE_CHECKING:  # grpc costs ~40 ms to import: only commands that call the daemon pay for it.
    from runtimed.client import Client

PROG = "runtimectl"
ERROR_EXIT = 125  # docker's code for errors of the daemon or of the CLI itself

Handler = Callable[["Context", argparse.Namespace], int | None]


class CLIError(Exception):
    """A failure the user should read as one line (exit 125)."""


class Context:
    """The global options and a client made on first use."""

    def __init__(self, address: str, namespace: str, timeout: float) -> None:
        self.address = "unix://" + address if address.startswith("/") else address
        self.namespace = namespace
        self.timeout = timeout
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            from runtimed.client import Client

            self._client = Client(self.address, self.namespace, self.timeout)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def error_message(exc: BaseException, ctx: Context) -> str | None:
    """The one-line text for an error of a daemon call; None if exc is not one."""
    if isinstance(exc, CLIError):
        return str(exc)
    grpc = sys.modules.get("grpc")
    if grpc is None or not isinstance(exc, grpc.RpcError) or not hasattr(exc, "code"):
        return None
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and not details.endswith(": unavailable"):
        # The channel could not connect (runtimed's own Unavailable errors end with the class text).
        if "ermission denied" in details:
            return f"permission denied while connecting to runtimed at {ctx.address}"
        return f"cannot connect to runtimed at {ctx.address}: is the daemon running?"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and not details.endswith("deadline exceeded"):
        return f"no answer from runtimed at {ctx.address} within {ctx.timeout:g}s (see --timeout)"
    return details or code.name.lower().replace("_", " ")


def report(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def for_each(ctx: Context, names: Iterable[str], action: Callable[[str], Any], *, echo: bool = True) -> int:
    """Run action on every name like `docker rm`: print each done, report each failure, go on."""
    status = 0
    for name in names:
        try:
            action(name)
        except Exception as exc:
            message = error_message(exc, ctx)
            if message is None:
                raise
            report(message)
            status = ERROR_EXIT
            if message.startswith(("cannot connect", "permission denied")):
                break
        else:
            if echo:
                print(name)
    return status


def label_arg(text: str) -> tuple[str, str]:
    """argparse type of a KEY=VALUE label (VALUE may be empty)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"invalid label {text!r}: expected KEY=VALUE")
    return key, value


def group(
    subparsers: argparse._SubParsersAction, name: str, help: str, aliases: Iterable[str] = ()
) -> argparse._SubParsersAction:
    """A command group (`runtimectl NAME ACTION ...`); bare `runtimectl NAME` prints its help."""
    parser = subparsers.add_parser(name, aliases=list(aliases), help=help, description=help)
    parser.set_defaults(func=lambda ctx, args: parser.print_help())
    return parser.add_subparsers(title="commands", metavar="COMMAND")


def env_default(name: str, fallback: str) -> str:
    return os.environ.get(name) or fallback
