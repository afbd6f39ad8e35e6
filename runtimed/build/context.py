"""The build context: `.dockerignore` matching, COPY/ADD source selection, and the content digest
the cache keys on.

.dockerignore follows docker's rules (moby/patternmatcher): one pattern per line, `#` comments,
surrounding white space trimmed, each pattern cleaned (`filepath.Clean`) with a leading `/`
dropped; `*` and `?` do not match `/`, `**` matches any number of directories (none included),
`[...]` classes and `\\` escapes as in Go's filepath.Match; a pattern that matches a parent
directory excludes everything below it; `!pattern` re-includes; the last matching pattern wins.
The Dockerfile and .dockerignore themselves are read whatever the patterns say, but COPY and ADD
see the context only through the patterns, as with docker.

The digest of a COPY's sources covers, for every file in copy order, its path below the source,
type, permission bits, size, symlink target and the sha256 of its bytes: not mtimes and not the
owner in the context (COPY sets the owner to 0:0 or --chown, which is part of the instruction).
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from runtimed.errors import InvalidArgument, NotFound
from runtimed.paths import follow_in_root

_WILDCARDS = re.compile(r"[*?\[]")


class _Pattern:
    def __init__(self, text: str, exclusion: bool) -> None:
        self.text = text
        self.exclusion = exclusion
        self.regex = re.compile(_ignore_regex(text))

    def match(self, path: str) -> bool:
        return self.regex.match(path) is not None


def _ignore_regex(pattern: str) -> str:
    """patternmatcher's translation of a pattern into an anchored regular expression."""
    out = ["^"]
    i = 0
    in_class = False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*" and not in_class:
            if i + 1 < len(pattern) and pattern[i + 1] == "*":
                i += 1
                if i + 1 < len(pattern) and pattern[i + 1] == "/":
                    i += 1  # "**/" is "**"
                if i + 1 >= len(pattern):
                    out.append(".*")
                else:
                    out.append("(.*/)?")
            else:
                out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "\\":
            if i + 1 < len(pattern):
                i += 1
                out.append(re.escape(pattern[i]))
            else:
                out.append("\\\\")
        elif ch == "[":
            in_class = True
            out.append(ch)
        elif ch == "]":
            in_class = False
            out.append(ch)
        elif in_class:
            out.append(ch)  # ranges and ^ keep their meaning inside a class
        else:
            out.append(re.escape(ch))
        i += 1
    out.append("$")
    return "".join(out)


def _go_clean(path: str) -> str:
    cleaned = posixpath.normpath(path) if path else "."
    return "/" if cleaned.startswith("//") else cleaned


class IgnoreMatcher:
    def __init__(self, patterns: list[str]) -> None:
        self.patterns: list[_Pattern] = []
        for raw in patterns:
            text = raw.strip()
            if not text:
                continue
            exclusion = text.startswith("!")
            if exclusion:
                text = text[1:].strip()
            if text:
                text = _go_clean(text)
                if len(text) > 1 and text.startswith("/"):
                    text = text[1:]
            if exclusion and not text:
                raise InvalidArgument('.dockerignore: illegal exclusion pattern: "!"')
            if text:
                self.patterns.append(_Pattern(text, exclusion))
        self.has_exclusions = any(p.exclusion for p in self.patterns)

    @classmethod
    def read(cls, context: Path) -> IgnoreMatcher:
        try:
            text = (context / ".dockerignore").read_text(errors="replace")
        except FileNotFoundError:
            return cls([])
        return cls([line for line in text.splitlines() if not line.lstrip().startswith("#")])

    def excluded(self, path: str) -> bool:
        """Whether a context path ("a/b/c", relative) is left out (MatchesOrParentMatches)."""
        parent = posixpath.dirname(path) or "."
        parents = parent.split("/")
        matched = False
        for pattern in self.patterns:
            if pattern.exclusion != matched:
                continue
            match = pattern.match(path)
            if not match and parent != ".":
                match = any(pattern.match("/".join(parents[: i + 1])) for i in range(len(parents)))
            if match:
                matched = not pattern.exclusion
        return matched


def _go_match(pattern: str, name: str) -> bool:
    """Go's filepath.Match ('*' and '?' never match '/')."""
    out = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("^", "]") else i + 1)
            if end < 0:
                raise InvalidArgument(f"syntax error in pattern {pattern!r}")
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            out.append("[" + body + "]")
            i = end
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(ch))
        i += 1
    return re.fullmatch("".join(out), name) is not None


@dataclass(frozen=True)
class Entry:
    """One thing to copy: its path below the COPY source ("" for the source itself), where it is."""

    rel: str
    path: Path
    st: os.stat_result


@dataclass(frozen=True)
class Source:
    rel: str  # its path in the context ("." for the context itself)
    path: Path
    is_dir: bool


class BuildContext:
    def __init__(self, root: Path, *, ignore: bool = True) -> None:
        self.root = root.resolve()
        if not self.root.is_dir():
            raise InvalidArgument(f"build context {str(root)!r} is not a directory")
        self.ignore = IgnoreMatcher.read(self.root) if ignore else IgnoreMatcher([])
        self._all: list[str] | None = None

    def clean(self, source: str) -> str:
        """A COPY source as a context path; refused when it leaves the context."""
        cleaned = posixpath.normpath("/" + source).lstrip("/") or "."
        if posixpath.normpath(source.lstrip("/") or ".").startswith(".."):
            raise InvalidArgument(f"forbidden path outside the build context: {source}")
        return cleaned

    def _follow(self, rel: str) -> str:
        """A context path with its symlinks followed, staying inside the context."""
        try:
            return "/".join(follow_in_root(self.root, rel)) or "."
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise InvalidArgument(f"too many levels of symbolic links in {rel!r}") from None

    def all_paths(self) -> list[str]:
        if self._all is None:
            found: list[str] = []
            for directory, dirs, files in os.walk(self.root):
                base = os.path.relpath(directory, self.root)
                base = "" if base == "." else base + "/"
                kept = []
                for name in sorted(dirs):
                    rel = base + name
                    if self.ignore.has_exclusions or not self.ignore.excluded(rel):
                        kept.append(name)
                    found.append(rel)
                dirs[:] = kept
                found.extend(base + name for name in sorted(files))
            self._all = sorted(p for p in found if not self.ignore.excluded(p))
        return self._all

    def sources(self, source: str) -> list[Source]:
        """The context paths one COPY/ADD source names (wildcards expanded); NotFound if none."""
        rel = self.clean(source)
        if _WILDCARDS.search(rel):
            matches = [p for p in self.all_paths() if _go_match(rel, p)]
        elif rel == ".":
            matches = ["."]
        else:
            followed = self._follow(rel)
            matches = [followed] if (self.root / followed).exists() and not self._ignored(followed) else []
        if not matches:
            raise NotFound(
                f"file not found in build context or excluded by .dockerignore: stat {source}: "
                "file does not exist"
            )
        result = []
        for match in matches:
            path = self.root / match if match != "." else self.root
            result.append(Source(match, path, path.is_dir() and not path.is_symlink()))
        return result

    def _ignored(self, rel: str) -> bool:
        return rel != "." and self.ignore.excluded(rel)

    def entries(self, source: Source) -> Iterator[Entry]:
        """The source itself ("") and, for a directory, everything below it that is not ignored."""
        if not source.is_dir:
            yield Entry("", source.path, os.lstat(source.path))
            return
        yield Entry("", source.path, source.path.stat())
        prefix = "" if source.rel == "." else source.rel + "/"
        for directory, dirs, files in os.walk(source.path):
            base = os.path.relpath(directory, source.path)
            base = "" if base == "." else base + "/"
            kept = []
            for name in sorted(dirs):
                rel = base + name
                if self._ignored(prefix + rel):
                    if self.ignore.has_exclusions:
                        kept.append(name)  # something below may be re-included
                    continue
                kept.append(name)
                yield Entry(rel, Path(directory) / name, os.lstat(Path(directory) / name))
            dirs[:] = kept
            for name in sorted(files):
                rel = base + name
                if not self._ignored(prefix + rel):
                    yield Entry(rel, Path(directory) / name, os.lstat(Path(directory) / name))


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def entries_digest(groups: list[tuple[Source, list[Entry]]]) -> str:
    """The cache's view of what a COPY copies (see the module docstring)."""
    digest = hashlib.sha256()
    for source, entries in groups:
        digest.update(f"source {source.rel} {int(source.is_dir)}\n".encode())
        for entry in entries:
            st = entry.st
            kind = stat.S_IFMT(st.st_mode)
            fields = [entry.rel, oct(kind), oct(stat.S_IMODE(st.st_mode))]
            if stat.S_ISREG(st.st_mode):
                fields += [str(st.st_size), file_digest(entry.path)]
            elif stat.S_ISLNK(st.st_mode):
                fields.append(os.readlink(entry.path))
            digest.update(("\0".join(fields) + "\n").encode(errors="surrogateescape"))
    return digest.hexdigest()
