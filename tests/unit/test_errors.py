"""The one mapping from runtimed's exceptions to gRPC status codes."""

from __future__ import annotations

import grpc
import pytest

from runtimed import errors, identifiers


@pytest.mark.parametrize(
    ("exc", "code", "message"),
    [
        (errors.NotFound("container 'c1'"), grpc.StatusCode.NOT_FOUND, "container 'c1': not found"),
        (errors.AlreadyExists("image 'x'"), grpc.StatusCode.ALREADY_EXISTS, "image 'x': already exists"),
        (errors.InvalidArgument("bad"), grpc.StatusCode.INVALID_ARGUMENT, "bad: invalid argument"),
        (errors.FailedPrecondition("busy"), grpc.StatusCode.FAILED_PRECONDITION, "busy: failed precondition"),
        (errors.Unavailable("ref r locked"), grpc.StatusCode.UNAVAILABLE, "ref r locked: unavailable"),
        (errors.OutOfRange("offset"), grpc.StatusCode.OUT_OF_RANGE, "offset: out of range"),
        (
            errors.NotImplementedYet("checkpoint"),
            grpc.StatusCode.UNIMPLEMENTED,
            "checkpoint: not implemented",
        ),
        (errors.PluginSkipped("no runsc"), grpc.StatusCode.FAILED_PRECONDITION, "skip plugin: no runsc"),
        (TimeoutError("shim"), grpc.StatusCode.DEADLINE_EXCEEDED, "shim: deadline exceeded"),
    ],
)
def test_status_mapping(exc, code, message):
    assert errors.status_of(exc) == (code, message)


def test_unclassified_errors_are_internal_and_named():
    code, message = errors.status_of(KeyError("x"))
    assert code == grpc.StatusCode.INTERNAL
    assert "KeyError" in message


def test_class_text_is_not_doubled():
    assert str(errors.NotFound("image 'x': not found")) == "image 'x': not found"


def test_reason_is_the_message_without_class_text():
    assert errors.NotFound("image 'x'").reason == "image 'x'"


@pytest.mark.parametrize("value", ["a", "abc-def", "a.b_c-d", "A1", "x" * 76])
def test_valid_identifiers(value):
    assert identifiers.validate(value) == value


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "must not be empty"),
        ("x" * 77, "greater than maximum length"),
        ("-a", "must match"),
        ("a-", "must match"),
        ("a..b", "must match"),
        ("a/b", "must match"),
        ("a b", "must match"),
        ("ünï", "must match"),
    ],
)
def test_invalid_identifiers_name_the_field(value, fragment):
    with pytest.raises(errors.InvalidArgument, match=fragment) as info:
        identifiers.validate(value, "container id")
    assert str(info.value).startswith("container id: ")


def test_quoting_matches_go():
    assert errors.q("c1") == '"c1"'
    assert errors.q('a"b') == '"a\\"b"'
