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


# Lease ids are not identifiers in containerd: its clients make them with leases.WithRandomID,
# "<nanoseconds>-<4 chars of base64url>" (e.g. "830717848--jjQ"), and the server only requires
# them to be non-empty. Accept any printable ASCII without spaces, bounded.
MAX_LEASE_ID_LENGTH = 255
_LEASE_ID = re.compile(r"[\x21-\x7e]+")


def validate_lease_id(value: str, what: str = "lease id") -> str:
    if not value:
        raise InvalidArgument(f"{what} must not be empty")
    if len(value) > MAX_LEASE_ID_LENGTH or not _LEASE_ID.fullmatch(value):
        raise InvalidArgument(
            f"{what} {q(value[:MAX_LEASE_ID_LENGTH])} must be at most {MAX_LEASE_ID_LENGTH} "
            "printable ASCII characters without spaces"
        )
    return value
