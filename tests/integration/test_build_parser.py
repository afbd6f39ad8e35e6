"""The parts of runtimectl build that need no daemon: Dockerfile parsing, variable substitution and
.dockerignore matching (docker's rules)."""

from __future__ import annotations

import pytest

from runtimed.build.context import BuildContext, IgnoreMatcher
from runtimed.build.dockerfile import ParseError, name_values, parse
from runtimed.build.shell import SubstitutionError, process_word, process_words


def test_directives_continuations_and_comments():
    dockerfile = parse(
        "# syntax=docker/dockerfile:1\n"
        "# escape=`\n"
        "\n"
        "FROM busybox AS base\n"
        "# a comment\n"
        "RUN echo one `\n"
        "    # a comment inside the continuation\n"
        "\n"
        "    two\n"
        'COPY --chown=1:2 --from=base ["a b", "/dst/"]\n'
        "copy c:\\path /x\n"
    )
    assert dockerfile.escape == "`" and dockerfile.directives["syntax"] == "docker/dockerfile:1"
    keywords = [(i.keyword, i.line) for i in dockerfile.instructions]
    assert keywords == [("FROM", 4), ("RUN", 6), ("COPY", 10), ("COPY", 11)]
    run = dockerfile.instructions[1]
    assert run.rest == "echo one     two" and run.json is None
    copy = dockerfile.instructions[2]
    assert copy.flags == {"chown": "1:2", "from": "base"} and copy.json == ["a b", "/dst/"]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("FROM busybox\nFOO bar\n", "line 2: unknown instruction: FOO"),
        ("FROM busybox\nRUN\n", "line 2: RUN requires at least one argument"),
        ("FROM busybox\nCOPY onlyone\n", "line 2: COPY requires at least two arguments"),
        ("FROM busybox\nCOPY --nope=1 a b\n", "line 2: unknown flag: --nope for COPY"),
        ("RUN true\n", "line 1: no build stage in current context"),
        ("FROM busybox\nENV A=1 B\n", "line 2: Syntax error - can't find = in 'B'"),
        ("# comment only\n", "the Dockerfile has no instructions"),
        ("# escape=x\nFROM busybox\n", "line 1: invalid escape token"),
    ],
)
def test_parse_errors_name_the_line(text, words):
    with pytest.raises(ParseError) as caught:
        parse(text)
    assert words in caught.value.reason


def test_env_and_label_forms():
    old, new = parse('FROM x\nENV NAME the rest  of it\nLABEL a=1 "b c"="d e" f=\n').instructions[1:]
    assert name_values(old) == [("NAME", "the rest  of it")]
    assert name_values(new) == [("a", "1"), ('"b c"', '"d e"'), ("f", "")]


def test_variable_substitution():
    env = {"A": "alpha", "EMPTY": "", "SP": "x y"}
    assert process_word("$A ${A}-${A}", env) == "alpha alpha-alpha"
    assert process_word("${NONE:-dflt} ${EMPTY:-dflt} ${EMPTY-dflt}", env) == "dflt dflt "
    assert process_word("${A:+set} ${NONE:+set}.", env) == "set ."
    assert process_word("'$A' \"$A\" \\$A", env) == "$A alpha $A"
    assert process_word("$", env) == "$" and process_word("$NONE", env) == ""
    assert process_words('80 "$SP" ${A}/udp', env) == ["80", "x y", "alpha/udp"]
    with pytest.raises(SubstitutionError):
        process_word("${NONE:?must be set}", env)


@pytest.mark.parametrize(
    ("patterns", "path", "excluded"),
    [
        (["*.key"], "a.key", True),
        (["*.key"], "dir/a.key", False),  # * does not cross directories
        (["**/*.key"], "dir/sub/a.key", True),
        (["**/*.key"], "a.key", True),  # ** matches no directory too
        (["logs"], "logs/x/y.log", True),  # a parent matches
        (["logs", "!logs/keep.log"], "logs/keep.log", False),
        (["logs", "!logs/keep.log"], "logs/other.log", True),
        (["!a", "*"], "a", True),  # the last match wins
        (["/abs/path"], "abs/path", True),
        (["./x/../y"], "y", True),
        (["a?c"], "abc", True),
        (["a?c"], "a/c", False),
        (["[a-c]*"], "beta", True),
        (["docs/**"], "docs/a/b", True),
        (["docs/**"], "docsa", False),
        (["\\*"], "*", True),
    ],
)
def test_dockerignore_semantics(patterns, path, excluded):
    assert IgnoreMatcher(patterns).excluded(path) is excluded


def test_copy_sources_stay_in_the_context(tmp_path):
    (tmp_path / "in.txt").write_text("x")
    (tmp_path / "link").symlink_to("/etc/passwd")
    context = BuildContext(tmp_path)
    with pytest.raises(Exception, match="outside the build context"):
        context.sources("../etc/passwd")
    with pytest.raises(Exception, match="file not found in build context"):
        context.sources("link")  # /etc/passwd followed inside the context: not there
    assert [s.rel for s in context.sources("/in.txt")] == ["in.txt"]
    assert [s.rel for s in context.sources("*.txt")] == ["in.txt"]
