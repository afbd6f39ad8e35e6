"""Image reference parsing and normalisation, as docker and containerd do it."""

from __future__ import annotations

import pytest

from runtimed.errors import InvalidArgument
from runtimed.reference import Reference, parse

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("team/app", "docker.io/team/app:latest"),
        ("docker.io/busybox", "docker.io/library/busybox:latest"),
        ("index.docker.io/library/busybox", "docker.io/library/busybox:latest"),
        ("127.0.0.1:5000/team/app:v1", "127.0.0.1:5000/team/app:v1"),
        (f"localhost/app@{DIGEST}", f"localhost/app@{DIGEST}"),
        (f"app:v2@{DIGEST}", f"docker.io/library/app:v2@{DIGEST}"),
        ("localhost:5000/a/b/c", "localhost:5000/a/b/c:latest"),
        ("registry.example.com/x", "registry.example.com/x:latest"),
        ("[::1]:5000/app:tag", "[::1]:5000/app:tag"),
        ("Registry.Example.com/a", "Registry.Example.com/a:latest"),
        ("x/a_b__c-d--e.f", "docker.io/x/a_b__c-d--e.f:latest"),
        # A first component with "." is a host, whatever follows.
        ("a.b/c", "a.b/c:latest"),
        ("app:" + "T" * 128, "docker.io/library/app:" + "T" * 128),
        # No slash: "localhost:5000" is the repository "localhost" with the tag "5000", as in docker.
        ("localhost:5000", "docker.io/library/localhost:5000"),
    ],
)
def test_parse_normalises(text, canonical):
    ref = parse(text)
    assert str(ref) == canonical
    assert parse(str(ref)) == ref  # the canonical form is a fixed point


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("busybox", ("docker.io", "library/busybox", "latest", None)),
        ("127.0.0.1:5000/team/app:v1", ("127.0.0.1:5000", "team/app", "v1", None)),
        (f"localhost/app@{DIGEST}", ("localhost", "app", None, DIGEST)),
        (f"app:v2@{DIGEST}", ("docker.io", "library/app", "v2", DIGEST)),
    ],
)
def test_parts(text, parts):
    ref = parse(text)
    assert (ref.host, ref.repository, ref.tag, ref.digest) == parts


@pytest.mark.parametrize(
    ("text", "familiar"),
    [
        ("busybox", "busybox:latest"),
        ("docker.io/library/busybox:1.36", "busybox:1.36"),
        ("team/app:v1", "team/app:v1"),
        ("docker.io/library/a/b", "library/a/b:latest"),
        ("127.0.0.1:5000/team/app:v1", "127.0.0.1:5000/team/app:v1"),
        (f"localhost/app@{DIGEST}", f"localhost/app@{DIGEST}"),
    ],
)
def test_familiar_form(text, familiar):
    assert parse(text).familiar == familiar


def test_object_prefers_the_digest():
    assert parse("app:v1").object == "v1"
    assert parse(f"app:v1@{DIGEST}").object == DIGEST
    assert parse("app", default_tag=None).object == "latest"


def test_without_default_tag_a_name_stays_bare():
    ref = parse("127.0.0.1:5000/team/app", default_tag=None)
    assert ref.tag is None and str(ref) == "127.0.0.1:5000/team/app"
    assert ref.name == "127.0.0.1:5000/team/app"


def test_with_tag_and_with_digest():
    ref = parse("127.0.0.1:5000/app:v1")
    assert str(ref.with_digest(DIGEST)) == f"127.0.0.1:5000/app:v1@{DIGEST}"
    assert str(ref.with_digest(DIGEST).with_tag("v2")) == "127.0.0.1:5000/app:v2"


def test_constructor_validates():
    assert str(Reference("localhost", "app", "v1")) == "localhost/app:v1"
    with pytest.raises(InvalidArgument, match="invalid repository path component"):
        Reference("localhost", "App")
    with pytest.raises(InvalidArgument, match="invalid tag"):
        Reference("localhost", "app", "-bad")
    with pytest.raises(InvalidArgument, match="invalid registry host"):
        Reference("bad host", "app")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "must not be empty"),
        ("Busybox", "repository name must be lowercase"),
        ("team/App:v1", "repository name must be lowercase"),
        ("localhost:5000/Team/app", "repository name must be lowercase"),
        ("app:", "invalid tag"),
        ("app:-v1", "invalid tag"),
        ("app:v/1", 'invalid registry host "app:v"'),
        ("app:" + "t" * 129, "invalid tag"),
        ("app:t@g", "invalid checksum digest format"),
        ("app@sha256:abc", "invalid sha256 digest"),
        ("app@md5:" + "0" * 32, "unsupported digest algorithm"),
        ("app@", "invalid checksum digest format"),
        ("a//b", 'invalid repository path component ""'),
        ("a/b/", 'invalid repository path component ""'),
        ("-a/b", 'invalid repository path component "-a"'),
        ("x/a..b", "invalid repository path component"),
        ("a..b/c", "invalid registry host"),
        ("a_-b", "invalid repository path component"),
        ("bad_host.io/app", "invalid registry host"),
        ("host.io:/app", "invalid registry host"),
        ("app name", "must not contain whitespace"),
        ("a" * 64, "cannot specify 64-byte hexadecimal strings"),
        ("localhost/" + "a" * 250, "longer than 255 characters"),
        (":tag", "repository name must not be empty"),
    ],
)
def test_invalid_references_name_the_problem(text, fragment):
    with pytest.raises(InvalidArgument) as info:
        parse(text)
    assert fragment in str(info.value)
    assert str(info.value).endswith(": invalid argument")
