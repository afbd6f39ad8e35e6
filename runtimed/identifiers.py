"""Identifier validation, as containerd does it for namespaces, containers, leases and tasks."""

from __future__ import annotations

import re

from runtimed.errors import InvalidArgument, q

MAX_LENGTH = 76
_IDENTIFIER = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")


def validate(value: str, what: str = "identifier") -> str:
    """Return value if it is a valid identifier, else raise InvalidArgument naming `what`."""
    if not value:
        raise InvalidArgument(f"{what}: identifier must not be empty")
    if len(value) > MAX_LENGTH:
        raise InvalidArgument(
            f"{what}: identifier {q(value[:MAX_LENGTH])}... "
            f"greater than maximum length ({MAX_LENGTH} characters)"
        )
    if not _IDENTIFIER.fullmatch(value):
        raise InvalidArgument(f"{what}: identifier {q(value)} must match {_IDENTIFIER.pattern}")
    return value
