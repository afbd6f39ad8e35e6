"""Dockerfile parsing: directives, comments, line continuations, instructions with their flags and forms.

    dockerfile = parse(text)
    for instruction in dockerfile.instructions:
        instruction.keyword, instruction.line, instruction.flags, instruction.json, instruction.rest

Parser directives (`# syntax=...`, `# escape=\\` or `` ` ``, `# check=...`) are honoured only at
the very top, as docker does; `syntax` and `check` are accepted and ignored (there is no frontend
to switch to). A line ending in the escape character continues on the next one; comment lines
and empty lines inside a continuation are skipped. Anything that is not a known instruction is
a ParseError naming the line: nothing is built from a Dockerfile that does not parse.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from runtimed.build.shell import split_words
from runtimed.errors import InvalidArgument

INSTRUCTIONS = (
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
)
# The flags each instruction accepts (`--name=value`, or `--name` alone for a boolean).
FLAGS: dict[str, tuple[str, ...]] = {
    "FROM": ("platform",),
    "COPY": ("chown", "chmod", "from", "link"),
    "ADD": ("chown", "chmod", "link", "checksum", "keep-git-dir"),
    "RUN": ("mount", "network", "security"),
    "HEALTHCHECK": ("interval", "timeout", "start-period", "start-interval", "retries"),
}
# Instructions whose arguments may be a JSON array of strings ("exec form").
JSON_FORMS = ("RUN", "CMD", "ENTRYPOINT", "COPY", "ADD", "VOLUME", "SHELL", "HEALTHCHECK")
DIRECTIVES = ("escape", "syntax", "check")
_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")


class ParseError(InvalidArgument):
    """A Dockerfile that does not parse; the message names the line, as docker's does."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"dockerfile parse error line {line}: {message}")
        self.line = line


@dataclass
class Instruction:
    keyword: str  # upper case: "RUN"
    line: int  # where it starts (1-based)
    text: str  # the instruction as written (continuations joined), for progress and errors
    rest: str  # the arguments after the flags, raw
    flags: dict[str, str] = field(default_factory=dict)
    json: list[str] | None = None  # the exec form's array, when the arguments are one

    def error(self, message: str) -> ParseError:
        return ParseError(self.line, message)


@dataclass
class Dockerfile:
    instructions: list[Instruction]
    escape: str = "\\"
    directives: dict[str, str] = field(default_factory=dict)


def _logical_lines(text: str, escape: str, first_line: int, lines: list[str]) -> list[tuple[int, str]]:
    """(start line, joined text) of each instruction: comments dropped, continuations joined."""
    result: list[tuple[int, str]] = []
    current: list[str] = []
    start = 0
    for number, raw in enumerate(lines[first_line:], start=first_line + 1):
        line = raw.rstrip("\r")
        stripped = line.strip()
        if current and (not stripped or stripped.startswith("#")):
            continue  # comments and empty lines inside a continuation are skipped
        if not current:
            if not stripped or stripped.startswith("#"):
                continue
            start = number
            line = line.lstrip()
        body = line.rstrip()
        if body.endswith(escape):
            current.append(body[: -len(escape)])
            continue
        current.append(line)
        result.append((start, "".join(current)))
        current = []
    if current:
        result.append((start, "".join(current)))
    return result


def _flags(keyword: str, line: int, rest: str) -> tuple[dict[str, str], str]:
    flags: dict[str, str] = {}
    while rest.startswith("--"):
        word, _, remainder = rest.partition(" ")
        if not word[2:]:
            break
        name, has_value, value = word[2:].partition("=")
        if name not in FLAGS.get(keyword, ()):
            raise ParseError(line, f"unknown flag: --{name} for {keyword}")
        flags[name] = value if has_value else "true"
        rest = remainder.lstrip()
    return flags, rest


def _json_array(rest: str) -> list[str] | None:
    text = rest.strip()
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        return None
    return value


def parse(text: str) -> Dockerfile:
    lines = text.split("\n")
    escape = "\\"
    directives: dict[str, str] = {}
    first = 0
    for index, raw in enumerate(lines):
        match = _DIRECTIVE.match(raw.strip())
        if not match or match.group(1).lower() not in DIRECTIVES:
            break
        name, value = match.group(1).lower(), match.group(2)
        if name in directives:
            raise ParseError(index + 1, f"only one {name} parser directive can be used")
        if name == "escape" and value not in ("\\", "`"):
            raise ParseError(index + 1, f"invalid escape token '{value}' does not match ` or \\")
        directives[name] = value
        first = index + 1
    escape = directives.get("escape", escape)
    instructions: list[Instruction] = []
    for line, joined in _logical_lines(text, escape, first, lines):
        word, *remainder = re.split(r"[ \t]+", joined.strip(), maxsplit=1)
        rest = remainder[0] if remainder else ""
        keyword = word.upper()
        if keyword not in INSTRUCTIONS:
            raise ParseError(line, f"unknown instruction: {word}")
        rest = rest.strip()
        flags, rest = _flags(keyword, line, rest)
        instruction = Instruction(keyword, line, joined.strip(), rest, flags)
        if keyword in JSON_FORMS:
            instruction.json = _json_array(rest)
        _check(instruction, escape)
        instructions.append(instruction)
    if not instructions:
        raise ParseError(max(len(lines), 1), "the Dockerfile has no instructions")
    if instructions[0].keyword not in ("FROM", "ARG") or not any(i.keyword == "FROM" for i in instructions):
        bad = next(i for i in instructions if i.keyword not in ("FROM", "ARG"))
        raise bad.error(f"no build stage in current context: {bad.keyword} before any FROM")
    for instruction in instructions:
        if instruction.keyword == "FROM":
            break
        if instruction.keyword != "ARG":
            raise instruction.error(f"{instruction.keyword} before the first FROM")
    return Dockerfile(instructions, escape, directives)


def _check(instruction: Instruction, escape: str) -> None:
    """What docker refuses while parsing: missing arguments and malformed forms."""
    keyword, rest = instruction.keyword, instruction.rest
    needs_args = keyword not in ("CMD", "ENTRYPOINT", "HEALTHCHECK")
    if needs_args and not rest:
        raise instruction.error(f"{keyword} requires at least one argument")
    if keyword in ("COPY", "ADD"):
        words = instruction.json if instruction.json is not None else split_words(rest, escape)
        if len(words) < 2:
            raise instruction.error(f"{keyword} requires at least two arguments, but only one was provided")
    if keyword == "SHELL" and (instruction.json is None or not instruction.json):
        raise instruction.error("SHELL requires the arguments to be in JSON form")
    if keyword in ("ENV", "LABEL"):
        name_values(instruction, escape)
    if keyword in ("WORKDIR", "USER", "STOPSIGNAL") and len(split_words(rest, escape)) != 1:
        raise instruction.error(f"{keyword} requires exactly one argument")
    if keyword == "FROM":
        words = split_words(rest, escape)
        if len(words) not in (1, 3) or (len(words) == 3 and words[1].lower() != "as"):
            raise instruction.error("FROM requires either one or three arguments (FROM IMAGE [AS NAME])")


def name_values(instruction: Instruction, escape: str = "\\") -> list[tuple[str, str]]:
    """ENV and LABEL arguments as raw (name, value) pairs: `name value` or `name=value ...`."""
    words = split_words(instruction.rest, escape)
    if not words:
        raise instruction.error(f"{instruction.keyword} requires at least one argument")
    if "=" not in words[0]:
        # The old form: ENV NAME the rest of the line
        parts = re.split(r"[ \t]+", instruction.rest.strip(), maxsplit=1)
        if len(parts) < 2:
            raise instruction.error(f"{instruction.keyword} names can not be blank: {instruction.rest!r}")
        return [(parts[0], parts[1])]
    pairs = []
    for word in words:
        name, sep, value = word.partition("=")
        if not sep:
            raise instruction.error(
                f"Syntax error - can't find = in {word!r}. Must be of the form: name=value"
            )
        if not name:
            raise instruction.error(f"{instruction.keyword} names can not be blank")
        pairs.append((name, value))
    return pairs
