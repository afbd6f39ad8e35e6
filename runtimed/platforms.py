"""Platforms (os/architecture/variant), normalised and matched the way containerd does."""

from __future__ import annotations

import os
from dataclasses import dataclass

from runtimed.errors import InvalidArgument, q

_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm", "armel": "arm"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        """ "linux/amd64", "linux/arm64/v8", "amd64" (os defaults to linux)."""
        parts = [p for p in text.strip().lower().split("/")]
        if not text or any(not p for p in parts) or len(parts) > 3:
            raise InvalidArgument(f"platform {q(text)} must look like os/arch[/variant]")
        if len(parts) == 1:
            parts = ["linux", parts[0]]
        return cls(*parts).normalized()

    @classmethod
    def host(cls) -> Platform:
        return cls("linux", os.uname().machine).normalized()

    def normalized(self) -> Platform:
        architecture = _ARCH_ALIASES.get(self.architecture, self.architecture)
        variant = self.variant
        if architecture == "arm64" and variant == "v8":
            variant = ""  # arm64 implies v8; containerd treats them as equal
        if architecture == "amd64" and variant == "v1":
            variant = ""
        return Platform(self.os.lower(), architecture, variant)

    def matches(self, other: Platform) -> bool:
        mine, theirs = self.normalized(), other.normalized()
        if (mine.os, mine.architecture) != (theirs.os, theirs.architecture):
            return False
        return not mine.variant or not theirs.variant or mine.variant == theirs.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)
