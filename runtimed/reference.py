"""Image references ("busybox", "127.0.0.1:5000/team/app:v1", "name:tag@sha256:...").

Parsed and normalised the way docker and containerd do (distribution/reference's
ParseNormalizedNamed followed by TagNameOnly):

* a first path component is a registry host only when it contains "." or ":" or is
  "localhost"; otherwise the host is docker.io, and a single-component docker.io name
  gets the "library/" prefix: ``busybox`` -> ``docker.io/library/busybox:latest``;
* a reference with neither tag nor digest gets the tag "latest";
* repository path components are lowercase alphanumerics joined by ".", "_", "__" or
  dashes; tags match ``[\\w][\\w.-]{0,127}``; digests are validated by runtimed.digests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from runtimed import digests
from runtimed.errors import InvalidArgument, q

DEFAULT_HOST = "docker.io"
DEFAULT_TAG = "latest"
OFFICIAL_PREFIX = "library/"
# distribution/reference's NameTotalLengthMax: host plus repository path.
NAME_MAX_LENGTH = 255

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
# A bare image ID; docker refuses it as a repository name because it is ambiguous.
_IMAGE_ID = re.compile(r"[a-f0-9]{64}")
_LEGACY_HOSTS = {"index.docker.io": DEFAULT_HOST}


@dataclass(frozen=True)
class Reference:
    """A normalised image reference. Build one with parse(); the constructor validates too."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        _check_host(self.host, str(self))
        _check_repository(self.repository, str(self))
        if self.tag is not None:
            _check_tag(self.tag, str(self))
        if self.digest is not None:
            digests.validate(self.digest, f"reference {q(str(self))}: digest")
        if len(self.name) > NAME_MAX_LENGTH:
            raise InvalidArgument(
                f"reference {q(str(self))}: repository name longer than {NAME_MAX_LENGTH} characters"
            )

    @property
    def name(self) -> str:
        """host/repository, without tag or digest."""
        return f"{self.host}/{self.repository}"

    @property
    def object(self) -> str:
        """What a registry resolves: the digest when there is one (it pins the content), else the tag."""
        if self.digest is not None:
            return self.digest
        return self.tag or DEFAULT_TAG

    @property
    def familiar(self) -> str:
        """The short form docker displays: docker.io and its library/ prefix dropped."""
        name = self.name
        if self.host == DEFAULT_HOST:
            name = self.repository
            rest = name.removeprefix(OFFICIAL_PREFIX)
            if rest != name and "/" not in rest:
                name = rest
        return name + self._suffix()

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.host, self.repository, tag, None)

    def with_digest(self, digest: str) -> Reference:
        """The same name pinned to a digest (the tag is kept, as containerd's resolver does)."""
        return Reference(self.host, self.repository, self.tag, digest)

    def _suffix(self) -> str:
        suffix = f":{self.tag}" if self.tag is not None else ""
        return suffix + (f"@{self.digest}" if self.digest is not None else "")

    def __str__(self) -> str:
        return self.name + self._suffix()


def parse(text: str, *, default_tag: str | None = DEFAULT_TAG) -> Reference:
    """Parse and normalise a docker-style reference.

    default_tag is added when the reference has neither tag nor digest; pass None to keep a
    bare repository name (e.g. the source repository of a cross-repository blob mount).
    """
    if not isinstance(text, str) or not text:
        raise InvalidArgument("image reference must not be empty")
    if text != text.strip() or any(c.isspace() for c in text):
        raise InvalidArgument(f"reference {q(text)}: must not contain whitespace")
    if _IMAGE_ID.fullmatch(text):
        raise InvalidArgument(
            f"reference {q(text)}: invalid repository name, cannot specify 64-byte hexadecimal strings"
        )

    name, at, digest = text.partition("@")
    if at:
        digests.validate(digest, f"reference {q(text)}: digest")
    # The tag separator is the last ":" after the last "/" (a ":" before it is a host's port).
    tag: str | None = None
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        name, tag = name[:colon], name[colon + 1 :]
        _check_tag(tag, text)
    if not name:
        raise InvalidArgument(f"reference {q(text)}: repository name must not be empty")

    host, repository = _split_host(name)
    if repository != repository.lower():
        raise InvalidArgument(f"reference {q(text)}: repository name must be lowercase")
    _check_host(host, text)
    _check_repository(repository, text)
    if tag is None and not at and default_tag is not None:
        tag = default_tag
    return Reference(host, repository, tag, digest if at else None)


def _split_host(name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    if not slash or ("." not in first and ":" not in first and first != "localhost"):
        host, repository = DEFAULT_HOST, name
    else:
        host, repository = _LEGACY_HOSTS.get(first, first), rest
    if host == DEFAULT_HOST and "/" not in repository:
        repository = OFFICIAL_PREFIX + repository
    return host, repository


def _check_host(host: str, text: str) -> None:
    if not _HOST.fullmatch(host):
        raise InvalidArgument(f"reference {q(text)}: invalid registry host {q(host)}")


def _check_repository(repository: str, text: str) -> None:
    if not repository:
        raise InvalidArgument(f"reference {q(text)}: repository name must not be empty")
    for component in repository.split("/"):
        if not _PATH_COMPONENT.fullmatch(component):
            raise InvalidArgument(
                f"reference {q(text)}: invalid repository path component {q(component)}: "
                "must be lowercase letters and digits separated by '.', '_', '__' or '-'"
            )


def _check_tag(tag: str, text: str) -> None:
    if not _TAG.fullmatch(tag):
        raise InvalidArgument(
            f"reference {q(text)}: invalid tag {q(tag)}: must match {_TAG.pattern} (at most 128 characters)"
        )
