"""The one exception hierarchy of runtimed and its one mapping to gRPC status codes.

Core code raises these with a message naming what was wrong ("container "c1": not
found"); only the gRPC edge (runtimed.server.interceptors) turns them into a status.
Messages end with the class text (": not found"), the form containerd's Go client
strips and re-appends, so `ctr` prints them naturally.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3

import grpc


def q(value: object) -> str:
    """Quote a value in error messages the way containerd's Go code does (%q)."""
    return json.dumps(str(value), ensure_ascii=False)


class RuntimedError(Exception):
    """Base of every error runtimed reports to a client."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    suffix: str = "unknown"

    def __init__(self, message: str) -> None:
        # Without the class text, for people reading a command's error line.
        self.reason = message
        if self.suffix and not message.endswith(": " + self.suffix):
            message = f"{message}: {self.suffix}"
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0])


class InvalidArgument(RuntimedError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    suffix = "invalid argument"


class NotFound(RuntimedError):
    code = grpc.StatusCode.NOT_FOUND
    suffix = "not found"


class AlreadyExists(RuntimedError):
    code = grpc.StatusCode.ALREADY_EXISTS
    suffix = "already exists"


class FailedPrecondition(RuntimedError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    suffix = "failed precondition"


class Unavailable(RuntimedError):
    code = grpc.StatusCode.UNAVAILABLE
    suffix = "unavailable"


class OutOfRange(RuntimedError):
    code = grpc.StatusCode.OUT_OF_RANGE
    suffix = "out of range"


class NotImplementedYet(RuntimedError):
    code = grpc.StatusCode.UNIMPLEMENTED
    suffix = "not implemented"


class PermissionDenied(RuntimedError):
    code = grpc.StatusCode.PERMISSION_DENIED
    suffix = "permission denied"


class ResourceExhausted(RuntimedError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    suffix = "resource exhausted"


class Aborted(RuntimedError):
    code = grpc.StatusCode.ABORTED
    suffix = "aborted"


class Internal(RuntimedError):
    code = grpc.StatusCode.INTERNAL
    suffix = "internal"


class PluginSkipped(RuntimedError):
    """A plugin that does not apply to this host (missing binary, kernel feature, ...).

    Raised from a plugin's init; Introspection reports it as "skip plugin: <reason>",
    which `ctr plugins ls` shows as status `skip`.
    """

    code = grpc.StatusCode.FAILED_PRECONDITION
    suffix = ""

    def __init__(self, reason: str) -> None:
        super().__init__(f"skip plugin: {reason}")


class StartupError(RuntimedError):
    """The daemon cannot start (root locked, address in use, bad paths)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    suffix = ""


class ConfigError(RuntimedError):
    """Invalid daemon or plugin configuration; stops the daemon at start-up."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    suffix = ""


#: Longest status message sent (gRPC clients refuse trailers over 8 KiB by default).
MAX_MESSAGE_LENGTH = 4096


def bounded(message: str, limit: int = MAX_MESSAGE_LENGTH) -> str:
    """message, its middle elided if longer than limit (the end keeps containerd's class text)."""
    if len(message) <= limit:
        return message
    tail = limit // 4
    elided = len(message) - (limit - tail - 40) - tail
    return f"{message[: limit - tail - 40]} ...[{elided} characters elided]... {message[-tail:]}"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map any exception to the (code, message) a client sees: the single mapping point."""
    code, message = _status_of(exc)
    return code, bounded(message)


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RuntimedError):
        return exc.code, exc.message
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, f"{exc or 'method'}: not implemented"
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, f"{exc or 'operation timed out'}: deadline exceeded"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        # A full disk is the host's condition, not a bug: name what was being written.
        what = f"writing {q(exc.filename)}: " if exc.filename else ""
        reason = os.strerror(exc.errno).lower()
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"{what}{reason}: resource exhausted"
    if isinstance(exc, sqlite3.OperationalError) and "database or disk is full" in str(exc):
        reason = "writing a database: no space left on device"
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"{reason}: resource exhausted"
    # Anything unclassified is a bug in runtimed: say so without leaking internals.
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
