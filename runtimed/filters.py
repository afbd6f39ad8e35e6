"""containerd's filter language (github.com/containerd/containerd/filters, v1.6).

A filter is a comma separated list of selectors, all of which must match (AND)::

    <fieldpath>[<operator><value>]

    name==foo,labels."com.example/key"~=^v[0-9]+$

* fieldpath: fields separated by ``.``; a field is ``[A-Za-z0-9_]+`` or a
  double-quoted string with Go escapes (``labels."a.b"``).
* operator: ``==`` (present and equal), ``!=`` (not equal; an absent field
  counts as ""), ``~=`` (regular expression, unanchored search like Go's
  ``MatchString``; an absent field is matched as "").  Without operator and
  value the selector tests that the field is present.
* value: a bare word (anything up to a comma or whitespace) or a
  double-quoted string; a ``~=`` value may also be quoted as ``/.../`` or
  ``|...|``, with the same Go escapes (``\\/`` inside slashes).

There is no OR inside one filter string: as in containerd, ``||`` is just part
of a bare value.  List RPCs take ``repeated string filters`` that are OR-ed:
:func:`parse_all`.  The empty string matches everything.

Parse errors read exactly as containerd's, e.g.
``filters: parse error: [name==foo,]: expected field or quoted`` or
``filters: parse error: [labels. >|?|< x]: expected field or quoted``, the
character between ``>|`` and ``|<`` being where parsing failed.  They are
raised as :class:`runtimed.errors.InvalidArgument`.

Differences from containerd, on purpose:

* Filter text is bounded (:data:`MAX_FILTER_LENGTH`).
* Regular expressions are compiled once when parsing, and one that does not
  compile is a parse error (containerd logs it and matches nothing).
* ``~=`` uses Python's ``re`` on a translation of the RE2 pattern: Go-only
  syntax (``\\z``, ``\\Q...\\E``, ``\\x{...}``, ``[[:alpha:]]``, octal escapes,
  ``(?i)`` in mid-pattern, ``(?<name>...)``) is rewritten, ASCII-only ``\\d \\w \\s \\b``
  and end-of-text ``$`` are kept, and Python-only syntax (look-around,
  back-references, possessive quantifiers, atomic groups) is rejected as RE2
  rejects it.  Unicode classes (``\\pL``) and the ungreedy flag ``(?U)`` are
  not supported and rejected.  Python's engine backtracks, so a pathological
  pattern can be slow on long values.

Fields containerd 1.6 exposes per object (an absent or empty string field is
"not present" unless said otherwise):

* containers: ``id``, ``image``, ``runtime.name``, ``labels.*``
  (not ``snapshotter``; a bare ``runtime`` is never present)
* images: ``name``, ``target.digest``, ``target.mediatype``, ``labels.*``,
  ``annotations.*`` (the target descriptor's annotations)
* content info: ``digest`` (always present), ``labels.*``; ``size`` is never present
* content ingests (ListStatuses): ``ref`` (always present)
* leases: ``id``, ``labels.*``
* snapshots: ``kind`` (active/view/committed), ``name``, ``parent`` (all
  always present, even if empty), ``labels.*``
* events: ``topic``, ``namespace``, ``event.<field>`` of the decoded event
  (e.g. ``event.id``, ``event.container_id``, ``event.runtime.name``,
  ``event.labels.*``)
* plugins (Introspection): ``type``, ``id`` (``platforms`` and ``capabilities``
  are never present)
* task metrics: ``id``, ``namespace`` (always present)
* namespaces: containerd ignores ListNamespacesRequest.filter

A label map yields nothing when it is empty; otherwise ``labels.a.b`` and
``labels."a.b"`` both look up the label ``a.b``.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Protocol

try:  # Python's own regular expression parser and its opcodes
    from re import _constants as _c
    from re import _parser as _sre_parser
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _sre_parser  # type: ignore[no-redef]

from runtimed.errors import InvalidArgument

__all__ = [
    "ALWAYS",
    "MAX_FILTER_LENGTH",
    "Adaptor",
    "Filter",
    "adaptor_for",
    "parse",
    "parse_all",
]

#: Longest filter string accepted, in characters.
MAX_FILTER_LENGTH = 4096

Adaptor = Callable[[Sequence[str]], tuple[str, bool]]
"""Maps a field path to (value, present)."""


class Filter(Protocol):
    def match(self, adaptor: Adaptor) -> bool: ...


# ---------------------------------------------------------------------------
# Filters


class _Always:
    __slots__ = ()

    def match(self, adaptor: Adaptor) -> bool:
        return True

    def __repr__(self) -> str:
        return "ALWAYS"


#: The filter that matches everything (the empty filter string).
ALWAYS: Filter = _Always()


class _Selector:
    __slots__ = ("path", "value")

    def __init__(self, path: tuple[str, ...], value: str = "") -> None:
        self.path = path
        self.value = value

    def __repr__(self) -> str:
        return f"{type(self).__name__[1:]}({'.'.join(self.path)!r}, {self.value!r})"


class _Present(_Selector):
    __slots__ = ()

    def match(self, adaptor: Adaptor) -> bool:
        return adaptor(self.path)[1]


class _Equal(_Selector):
    __slots__ = ()

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.path)
        return present and value == self.value


class _NotEqual(_Selector):
    __slots__ = ()

    def match(self, adaptor: Adaptor) -> bool:
        return adaptor(self.path)[0] != self.value


class _Matches(_Selector):
    __slots__ = ("_search",)

    def __init__(self, path: tuple[str, ...], value: str, regex: _Searcher) -> None:
        super().__init__(path, value)
        self._search = regex.search

    def match(self, adaptor: Adaptor) -> bool:
        return self._search(adaptor(self.path)[0]) is not None


class _All:
    __slots__ = ("filters",)

    def __init__(self, filters: Sequence[Filter]) -> None:
        self.filters = tuple(filters)

    def match(self, adaptor: Adaptor) -> bool:
        return all(f.match(adaptor) for f in self.filters)

    def __repr__(self) -> str:
        return f"All{list(self.filters)!r}"


class _Any:
    __slots__ = ("filters",)

    def __init__(self, filters: Sequence[Filter]) -> None:
        self.filters = tuple(filters)

    def match(self, adaptor: Adaptor) -> bool:
        return any(f.match(adaptor) for f in self.filters)

    def __repr__(self) -> str:
        return f"Any{list(self.filters)!r}"


# ---------------------------------------------------------------------------
# Public entry points


def parse(expr: str) -> Filter:
    """Compile one filter string; raise InvalidArgument on a syntax error."""
    if not isinstance(expr, str):
        raise InvalidArgument(f"filters: filter must be a string, not {type(expr).__name__}")
    if len(expr) > MAX_FILTER_LENGTH:
        raise InvalidArgument(
            f"filters: parse error: filter of {len(expr)} characters is longer than "
            f"{MAX_FILTER_LENGTH}: {expr[:64]!r}..."
        )
    if expr == "":
        return ALWAYS
    return _Parser(expr).parse()


def parse_all(exprs: Iterable[str]) -> Filter:
    """Compile the filters of a list RPC: any may match; none (or "") matches everything."""
    # Every filter is parsed, even after an empty one: a malformed one is an error.
    filters = [parse(expr) for expr in exprs]
    if not filters or any(f is ALWAYS for f in filters):
        return ALWAYS
    if len(filters) == 1:
        return filters[0]
    return _Any(filters)


def adaptor_for(
    fields: Mapping[str, str],
    labels: Mapping[str, str] | None = None,
    *,
    always_present: Collection[str] = (),
    **nested: Mapping[str, str],
) -> Adaptor:
    """Build the adaptor of one record for the common shapes of containerd objects.

    ``fields`` maps dotted field paths (``"id"``, ``"runtime.name"``,
    ``"event.container_id"``) to string values.  As in containerd, a field
    whose value is empty is not present, unless its key is in
    ``always_present`` (snapshots' ``parent``, content's ``digest``...).

    ``labels`` and each keyword map (``annotations=...``; a dotted prefix goes
    through ``**{"event.labels": ...}``) is reached as ``<prefix>.<key>``,
    the key being the rest of the path joined with ``.``.  An empty or
    missing map yields nothing.
    """
    if not nested and not always_present:
        # The common case: plain fields and labels.
        def adapt_simple(path: Sequence[str]) -> tuple[str, bool]:
            n = len(path)
            if n == 0:
                return "", False
            head = path[0]
            if head == "labels":
                return _map_lookup(labels, path[1:])
            key = head if n == 1 else ".".join(path)
            value = fields.get(key)
            if not value or key.count(".") != n - 1:
                # Absent, empty, or a quoted component holding a "." (the path
                # runtime, name is the field "runtime.name"; "runtime.name" is not).
                return "", False
            return value, True

        return adapt_simple

    prefixes: dict[tuple[str, ...], Mapping[str, str] | None] = {("labels",): labels}
    for name, mapping in nested.items():
        prefixes[tuple(name.split("."))] = mapping
    single = {prefix[0]: mapping for prefix, mapping in prefixes.items() if len(prefix) == 1}
    multi = sorted(
        ((len(prefix), prefix, mapping) for prefix, mapping in prefixes.items() if len(prefix) > 1),
        key=lambda item: -item[0],
    )
    keep_empty = frozenset(always_present)

    def adapt(path: Sequence[str]) -> tuple[str, bool]:
        n = len(path)
        if n == 0:
            return "", False
        for size, prefix, mapping in multi:
            if n >= size and tuple(path[:size]) == prefix:
                return _map_lookup(mapping, path[size:])
        head = path[0]
        mapping = single.get(head, _NO_MAP)
        if mapping is not _NO_MAP:
            return _map_lookup(mapping, path[1:])
        key = head if n == 1 else ".".join(path)
        value = fields.get(key)
        if value is None or key.count(".") != n - 1:
            return "", False
        return value, bool(value) or key in keep_empty

    return adapt


_NO_MAP: Mapping[str, str] = {}


def _map_lookup(mapping: Mapping[str, str] | None, rest: Sequence[str]) -> tuple[str, bool]:
    if not mapping:
        return "", False
    value = mapping.get(".".join(rest))
    if value is None:
        return "", False
    return value, True


# ---------------------------------------------------------------------------
# Scanner

# Token kinds.
_EOF = "EOF"
_FIELD = "Field"
_VALUE = "Value"
_QUOTED = "Quoted"
_SEPARATOR = "Separator"
_OPERATOR = "Operator"
_ILLEGAL = "Illegal"
_OTHER = "Other"  # any other single character, text holds it

# Characters peek() reports for the end of input and for an illegal character.
_END = ""
_BAD = "\ufffd"

_FIELD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_OPERATOR_CHARS = frozenset("=!~")
_QUOTE_CHARS = frozenset('/|"')
# Go's unicode.IsSpace: the White_Space property.
_SPACE_CHARS = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_SIMPLE_ESCAPES = frozenset("abfnrtv\\")
_OCTAL = frozenset("01234567")
_HEX = frozenset("0123456789abcdefABCDEF")


def _is_value_char(ch: str) -> bool:
    # Go: graphic or punctuation, but no space and no comma.
    if ch == "," or ch in _SPACE_CHARS or ch in (_END, _BAD):
        return False
    if " " < ch < "\x7f":
        return True
    return unicodedata.category(ch)[0] in "LMNPS"


class _Scanner:
    """Splits filter text into tokens the way containerd's scanner does.

    Positions are character offsets.  ``err`` keeps the first problem met, as
    containerd's scanner does, and is the message of an Illegal token.
    """

    __slots__ = ("err", "pos", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0  # next character to read
        self.err = ""

    def _error(self, message: str) -> None:
        if not self.err:
            self.err = message

    def _char_at(self, i: int) -> str:
        """The character at i; _END past the end; _BAD (noting why) if illegal."""
        if i >= len(self.text):
            return _END
        ch = self.text[i]
        if ch == "\x00":
            self._error("unexpected null")
            return _BAD
        if ch == "\ufffd" or "\ud800" <= ch <= "\udfff":
            self._error("rune error")
            return _BAD
        return ch

    def peek(self) -> str:
        return self._char_at(self.pos)

    def scan(self, value: bool = False) -> tuple[int, str, str]:
        """Next token as (position, kind, text); `value` after an operator."""
        text = self.text
        while True:
            start = self.pos
            ch = self._char_at(start)
            if ch == _END:
                return len(text), _EOF, ""
            self.pos = start + 1
            if ch == _BAD:
                return start, _ILLEGAL, ""
            if ch not in _SPACE_CHARS:
                break
        if ch in _QUOTE_CHARS:
            kind = _QUOTED if self._scan_quoted(ch) else _ILLEGAL
            return start, kind, text[start : self.pos]
        if ch in ",.":
            return start, _SEPARATOR, ch
        if ch in _OPERATOR_CHARS:
            while self._char_at(self.pos) in _OPERATOR_CHARS:
                self.pos += 1
            return start, _OPERATOR, text[start : self.pos]
        if value:
            # The first character is taken whatever it is.
            while _is_value_char(self._char_at(self.pos)):
                self.pos += 1
            return start, _VALUE, text[start : self.pos]
        if ch in _FIELD_CHARS:
            while self._char_at(self.pos) in _FIELD_CHARS:
                self.pos += 1
            return start, _FIELD, text[start : self.pos]
        return start, _OTHER, ch

    def _scan_quoted(self, quote: str) -> bool:
        """Consume a quoted literal after its opening quote; False if it is malformed."""
        ok = True
        while True:
            ch = self._char_at(self.pos)
            if ch in (_END, _BAD, "\n"):
                if ch != _END:
                    self.pos += 1
                self._error("quoted literal not terminated")
                return False
            self.pos += 1
            if ch == quote:
                return ok
            if ch != "\\":
                continue
            esc = self._char_at(self.pos)
            if esc in _SIMPLE_ESCAPES or esc == quote:
                self.pos += 1
            elif esc in _OCTAL:
                ok = self._scan_digits(_OCTAL, 3) and ok
            elif esc in ("x", "u", "U"):
                self.pos += 1
                ok = self._scan_digits(_HEX, {"x": 2, "u": 4, "U": 8}[esc]) and ok
            else:
                # The character after the backslash is looked at again as
                # ordinary content (it may end the literal).
                self._error("illegal escape sequence")
                ok = False

    def _scan_digits(self, digits: frozenset[str], count: int) -> bool:
        for _ in range(count):
            if self._char_at(self.pos) not in digits:
                self._error("illegal numeric escape sequence")
                return False
            self.pos += 1
        return True


def _unquote(literal: str) -> str | None:
    """The value of a scanned quoted literal, Go escapes decoded; None if invalid."""
    if len(literal) < 2 or literal[-1] != literal[0]:
        return None
    quote = literal[0]
    body = literal[1:-1]
    if "\n" in body:
        return None
    if "\\" not in body and quote not in body:
        return body
    out = bytearray()
    i, n = 0, len(body)
    while i < n:
        ch = body[i]
        i += 1
        if ch == quote:
            return None
        if ch != "\\":
            out += ch.encode("utf-8")
            continue
        if i >= n:
            return None
        esc = body[i]
        i += 1
        simple = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}.get(esc)
        if simple is not None:
            out.append(simple)
        elif esc in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[esc]
            digits = body[i : i + width]
            if len(digits) < width or not all(d in _HEX for d in digits):
                return None
            i += width
            code = int(digits, 16)
            if esc == "x":
                out.append(code)  # one byte, maybe not UTF-8
            elif code > 0x10FFFF:
                return None
            else:
                if 0xD800 <= code <= 0xDFFF:
                    code = 0xFFFD  # what Go's utf8.EncodeRune writes
                out += chr(code).encode("utf-8")
        elif esc in _OCTAL:
            digits = body[i - 1 : i + 2]
            if len(digits) < 3 or not all(d in _OCTAL for d in digits):
                return None
            i += 2
            code = int(digits, 8)
            if code > 255:
                return None
            out.append(code)
        elif esc in "'\"|/":
            if esc != quote:
                return None
            out.append(ord(esc))
        else:
            return None
    # Bytes that are not UTF-8 (from \x or octal escapes) become lone
    # surrogates, which never equal a real value, as in Go.
    return out.decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------
# Parser


class _Parser:
    __slots__ = ("scanner", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.scanner = _Scanner(text)

    def error(self, pos: int, message: str) -> InvalidArgument:
        text = self.text
        # Point at the offending character, as containerd does.
        where = f"{text[:pos]} >|{text[pos]}|< {text[pos + 1 :]}" if pos < len(text) else text
        return InvalidArgument(f"filters: parse error: [{where}]: {message}")

    def parse(self) -> Filter:
        selectors = [self.selector()]
        while True:
            ch = self.scanner.peek()
            if ch == _END:
                break
            if ch != ",":
                raise self.error(self.scanner.pos, f"unexpected input: {ch}")
            self.scanner.scan()
            selectors.append(self.selector())
        return selectors[0] if len(selectors) == 1 else _All(selectors)

    def selector(self) -> Filter:
        path = self.fieldpath()
        if self.scanner.peek() in (",", _END):
            return _Present(path)
        pos, kind, text = self.scanner.scan()
        if kind == _ILLEGAL:
            raise self.error(pos, self.scanner.err)
        if kind != _OPERATOR:
            raise self.error(pos, 'expected an operator ("=="|"!="|"~=")')
        if text not in ("==", "!=", "~="):
            raise self.error(pos, f"unsupported operator {json.dumps(text)}")
        regex = text == "~="
        vpos, value = self.value(allow_alt_quotes=regex)
        if text == "==":
            return _Equal(path, value)
        if text == "!=":
            return _NotEqual(path, value)
        try:
            compiled = _compile_re2(value)
        except _RegexError as exc:
            quoted = json.dumps(value, ensure_ascii=False)
            raise self.error(vpos, f"invalid regular expression {quoted}: {exc}") from None
        return _Matches(path, value, compiled)

    def fieldpath(self) -> tuple[str, ...]:
        path = [self.field()]
        while self.scanner.peek() == ".":
            self.scanner.scan()
            path.append(self.field())
        return tuple(path)

    def field(self) -> str:
        pos, kind, text = self.scanner.scan()
        if kind == _FIELD:
            return text
        if kind == _QUOTED:
            return self.unquote(pos, text, allow_alt_quotes=False)
        if kind == _ILLEGAL:
            raise self.error(pos, self.scanner.err)
        raise self.error(pos, "expected field or quoted")

    def value(self, allow_alt_quotes: bool) -> tuple[int, str]:
        pos, kind, text = self.scanner.scan(value=True)
        if kind == _VALUE:
            return pos, text
        if kind == _QUOTED:
            return pos, self.unquote(pos, text, allow_alt_quotes)
        if kind == _ILLEGAL:
            raise self.error(pos, self.scanner.err)
        raise self.error(pos, "expected value or quoted")

    def unquote(self, pos: int, literal: str, allow_alt_quotes: bool) -> str:
        if not allow_alt_quotes and literal[0] != '"':
            raise self.error(pos, "invalid quote encountered")
        value = _unquote(literal)
        if value is None:
            raise self.error(pos, "unquoting failed: quote syntax error")
        return value


# ---------------------------------------------------------------------------
# RE2 patterns on Python's re


class _RegexError(Exception):
    pass


_MAX_REPEAT = 1000  # RE2's limit on {n,m}
_MAX_NESTING = 200  # RE2 allows 1000; Python's recursive compiler needs less
_MAX_RUNE = 0x10FFFF

_Ranges = list[tuple[int, int]]


def _ranges(spec: str) -> _Ranges:
    """Ranges from a spec like "a-z0": [(97, 122), (48, 48)]."""
    out: _Ranges = []
    i = 0
    while i < len(spec):
        if i + 2 < len(spec) and spec[i + 1] == "-":
            out.append((ord(spec[i]), ord(spec[i + 2])))
            i += 3
        else:
            out.append((ord(spec[i]), ord(spec[i])))
            i += 1
    return out


_DIGIT = _ranges("0-9")
_WORD = _ranges("0-9A-Z_a-z")
_PERL_SPACE = _ranges("\t\n\f\r ")
_POSIX = {
    "alnum": _ranges("0-9A-Za-z"),
    "alpha": _ranges("A-Za-z"),
    "ascii": _ranges("\x00-\x7f"),
    "blank": _ranges("\t "),
    "cntrl": _ranges("\x00-\x1f\x7f"),
    "digit": _DIGIT,
    "graph": _ranges("!-~"),
    "lower": _ranges("a-z"),
    "print": _ranges(" -~"),
    "punct": _ranges("!-/:-@[-`{-~"),
    "space": _ranges("\t\n\v\f\r "),
    "upper": _ranges("A-Z"),
    "word": _WORD,
    "xdigit": _ranges("0-9A-Fa-f"),
}
_PERL = {"d": _DIGIT, "w": _WORD, "s": _PERL_SPACE}


def _complement(ranges: _Ranges) -> _Ranges:
    out: _Ranges = []
    nxt = 0
    for lo, hi in sorted(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = max(nxt, hi + 1)
    if nxt <= _MAX_RUNE:
        out.append((nxt, _MAX_RUNE))
    return out


def _lit(code: int) -> str:
    """A code point as a Python pattern escape that is literal anywhere."""
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _class_items(ranges: _Ranges) -> str:
    return "".join(_lit(lo) if lo == hi else f"{_lit(lo)}-{_lit(hi)}" for lo, hi in ranges)


_WORD_CLASS = f"[{_class_items(_WORD)}]"
_BOUNDARY = f"(?:(?<={_WORD_CLASS})(?!{_WORD_CLASS})|(?<!{_WORD_CLASS})(?={_WORD_CLASS}))"
_NON_BOUNDARY = f"(?:(?<={_WORD_CLASS})(?={_WORD_CLASS})|(?<!{_WORD_CLASS})(?!{_WORD_CLASS}))"
_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}")
_FLAGS = re.compile(r"\(\?([a-zA-Z]*)(?:-([a-zA-Z]*))?([:)])")
_NAMED = re.compile(r"\(\?P?<([^>]*)>")


class _Searcher(Protocol):
    def search(self, text: str) -> object: ...


def _compile_re2(pattern: str) -> _Searcher:
    """A searcher for an RE2 pattern that never backtracks catastrophically.

    Python's engine backtracks: ``(a|a)*b`` takes seconds on 28 characters and ``.*.*x`` on a
    4 KiB label, holding the GIL (the whole daemon) all along. A pattern with at most one choice
    point (one variable repetition of a body without choices, or one alternation) runs on
    ``re``, where the worst case is quadratic and fast; any other runs on :class:`_PikeVM`, a
    linear-time automaton simulation, as RE2 itself does.
    """
    try:
        pattern.encode("utf-8")
    except UnicodeEncodeError:
        raise _RegexError("invalid UTF-8") from None
    translated = _Re2Translator(pattern).translate()
    try:
        compiled = re.compile(translated)
        if _choice_points(_sre_parser.parse(translated).data) <= 1:
            return compiled
        return _PikeVM(_sre_parser.parse(translated))
    except re.error as exc:
        raise _RegexError(exc.msg) from None
    except (OverflowError, RecursionError, ValueError) as exc:
        raise _RegexError(str(exc) or type(exc).__name__) from None


def _assertions_only(items: Sequence[tuple]) -> bool:
    """Whether an alternative only tests (the translator's \\b): exclusive, not a real choice."""
    return bool(items) and all(op in (_c.AT, _c.ASSERT, _c.ASSERT_NOT) for op, _ in items)


def _choice_points(items: Sequence[tuple]) -> int:
    """How many places a backtracking engine can choose at: variable repeats and alternations."""
    count = 0
    for op, av in items:
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
            low, high, body = av
            count += (low != high) + _choice_points(body.data) * (2 if high > 1 else 1)
        elif op is _c.BRANCH:
            alternatives = av[1]
            if not all(_assertions_only(alt.data) for alt in alternatives):
                count += 1
            count += sum(_choice_points(alt.data) for alt in alternatives)
        elif op in (_c.SUBPATTERN, _c.ASSERT, _c.ASSERT_NOT, _c.ATOMIC_GROUP):
            count += _choice_points(av[-1].data)
    return count


_MAX_PROGRAM = 20_000  # instructions of one compiled pattern (RE2 refuses big ones too)


class _PikeVM:
    """Unanchored search by simulating the pattern's NFA: time linear in the text's length.

    Compiled from Python's own parse of the translated pattern, so the syntax is exactly what
    ``re`` accepted. Lookarounds occur only as the translator's one-character word-boundary
    tests. Case folding under (?i) compares lower and upper case forms.
    """

    # Instructions: (CHAR, predicate) | (SPLIT, a, b) | (JMP, a) | (ASSERT, test) | (MATCH,)
    _CHAR, _SPLIT, _JMP, _ASSERT, _MATCH = range(5)

    def __init__(self, parsed: Any) -> None:
        self.prog: list[list[Any]] = []
        self._emit_seq(parsed.data, parsed.state.flags)
        self.prog.append([self._MATCH])

    # -- compilation ----------------------------------------------------------------------------

    def _add(self, *instr: Any) -> int:
        if len(self.prog) >= _MAX_PROGRAM:
            raise _RegexError("expression too large")
        self.prog.append(list(instr))
        return len(self.prog) - 1

    def _emit_seq(self, items: Sequence[tuple], flags: int) -> None:
        for op, av in items:
            self._emit(op, av, flags)

    def _emit(self, op: Any, av: Any, flags: int) -> None:
        if op in (_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN):
            self._add(self._CHAR, _char_predicate(op, av, flags))
        elif op is _c.SUBPATTERN:
            _group, add, delete, body = av
            self._emit_seq(body.data, (flags | add) & ~delete)
        elif op is _c.BRANCH:
            alternatives = av[1]
            jumps = []
            for k, alt in enumerate(alternatives):
                if k < len(alternatives) - 1:
                    split = self._add(self._SPLIT, None, None)
                    self.prog[split][1] = len(self.prog)
                    self._emit_seq(alt.data, flags)
                    jumps.append(self._add(self._JMP, None))
                    self.prog[split][2] = len(self.prog)
                else:
                    self._emit_seq(alt.data, flags)
            for jump in jumps:
                self.prog[jump][1] = len(self.prog)
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            low, high, body = av
            for _ in range(low):
                self._emit_seq(body.data, flags)
            if high == _c.MAXREPEAT:
                loop = self._add(self._SPLIT, None, None)
                self.prog[loop][1] = len(self.prog)
                self._emit_seq(body.data, flags)
                self._add(self._JMP, loop)
                self.prog[loop][2] = len(self.prog)
            else:
                splits = []
                for _ in range(high - low):
                    split = self._add(self._SPLIT, None, None)
                    self.prog[split][1] = len(self.prog)
                    splits.append(split)
                    self._emit_seq(body.data, flags)
                for split in splits:
                    self.prog[split][2] = len(self.prog)
        elif op is _c.AT:
            self._add(self._ASSERT, _at_test(av, flags))
        elif op in (_c.ASSERT, _c.ASSERT_NOT):
            direction, body = av
            if len(body.data) != 1 or body.data[0][0] not in (_c.IN, _c.LITERAL, _c.NOT_LITERAL, _c.ANY):
                raise _RegexError("unsupported lookaround")
            char = _char_predicate(*body.data[0], flags)
            wanted = op is _c.ASSERT
            if direction < 0:
                self._add(self._ASSERT, lambda before, after: (before != "" and char(before)) == wanted)
            else:
                self._add(self._ASSERT, lambda before, after: (after != "" and char(after)) == wanted)
        else:
            raise _RegexError(f"unsupported construct {op}")

    # -- matching -------------------------------------------------------------------------------

    def search(self, text: str) -> bool | None:
        prog = self.prog
        char_op, split_op, jmp_op, assert_op, match_op = range(5)
        current: list[int] = []
        seen: set[int] = set()

        def add(threads: list[int], seen: set[int], pc: int, before: str, after: str) -> bool:
            """Follow the empty transitions from pc; True when MATCH is reached."""
            stack = [pc]
            while stack:
                pc = stack.pop()
                if pc in seen:
                    continue
                seen.add(pc)
                instr = prog[pc]
                kind = instr[0]
                if kind == char_op:
                    threads.append(pc)
                elif kind == split_op:
                    stack.append(instr[2])
                    stack.append(instr[1])
                elif kind == jmp_op:
                    stack.append(instr[1])
                elif kind == assert_op:
                    if instr[1](before, after):
                        stack.append(pc + 1)
                elif kind == match_op:
                    return True
            return False

        n = len(text)
        for i in range(n + 1):
            before = text[i - 1] if i else ""
            after = text[i] if i < n else ""
            # Unanchored: a new thread starts at every position.
            if add(current, seen, 0, before, after):
                return True
            if i == n:
                break
            following: list[int] = []
            next_seen: set[int] = set()
            next_after = text[i + 1] if i + 1 < n else ""
            for pc in current:
                if prog[pc][1](after) and add(following, next_seen, pc + 1, after, next_after):
                    return True
            current, seen = following, next_seen
        return None


def _char_predicate(op: Any, av: Any, flags: int) -> Callable[[str], bool]:
    ignore = bool(flags & re.IGNORECASE)
    if op is _c.ANY:
        if flags & re.DOTALL:
            return lambda ch: True
        return lambda ch: ch != "\n"
    if op in (_c.LITERAL, _c.NOT_LITERAL):
        literal = chr(av)
        negate = op is _c.NOT_LITERAL
        if ignore:
            forms = {literal, literal.lower(), literal.upper()}
            return lambda ch: ((ch in forms) or (ch.lower() in forms) or (ch.upper() in forms)) != negate
        return lambda ch: (ch == literal) != negate
    negate = False
    ranges: list[tuple[int, int]] = []
    categories: list[Any] = []
    for item_op, item_av in av:
        if item_op is _c.NEGATE:
            negate = True
        elif item_op is _c.LITERAL:
            ranges.append((item_av, item_av))
        elif item_op is _c.RANGE:
            ranges.append(item_av)
        elif item_op is _c.CATEGORY:
            categories.append(_CATEGORIES[item_av])
        else:
            raise _RegexError(f"unsupported class item {item_op}")

    def member(ch: str) -> bool:
        code = ord(ch)
        return any(lo <= code <= hi for lo, hi in ranges) or any(test(ch) for test in categories)

    if ignore:

        def folded(ch: str) -> bool:
            return member(ch) or member(ch.lower()[:1] or ch) or member(ch.upper()[:1] or ch)

        return lambda ch: folded(ch) != negate
    return lambda ch: member(ch) != negate


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_CATEGORIES: dict[Any, Callable[[str], bool]] = {
    _c.CATEGORY_DIGIT: str.isdecimal,
    _c.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
    _c.CATEGORY_WORD: _is_word,
    _c.CATEGORY_NOT_WORD: lambda ch: not _is_word(ch),
    _c.CATEGORY_SPACE: str.isspace,
    _c.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
}


def _at_test(where: Any, flags: int) -> Callable[[str, str], bool]:
    multiline = bool(flags & re.MULTILINE)
    if where is _c.AT_BEGINNING_STRING or (where is _c.AT_BEGINNING and not multiline):
        return lambda before, after: before == ""
    if where is _c.AT_BEGINNING:
        return lambda before, after: before in ("", "\n")
    if where is _c.AT_END_STRING:
        return lambda before, after: after == ""
    if where is _c.AT_END:
        # Python's $: at the end or before a newline (only the final one without (?m)); the
        # translator emits it only under (?m), where any newline counts.
        return lambda before, after: after in ("", "\n")
    if where is _c.AT_BOUNDARY:
        return lambda before, after: _is_word(before or " ") != _is_word(after or " ")
    if where is _c.AT_NON_BOUNDARY:
        return lambda before, after: _is_word(before or " ") == _is_word(after or " ")
    raise _RegexError(f"unsupported anchor {where}")


class _Frame:
    """An open group: whether (?m) is on, and (?flags) wrappers opened inside it."""

    __slots__ = ("multiline", "wrappers")

    def __init__(self, multiline: bool) -> None:
        self.multiline = multiline
        self.wrappers: list[str] = []


class _Re2Translator:
    """Rewrites an RE2 (Go regexp/syntax) pattern into an equivalent Python one."""

    def __init__(self, pattern: str) -> None:
        self.p = pattern
        self.i = 0
        self.out: list[str] = []
        self.frames = [_Frame(False)]
        self.depth = 0
        # Whether the last thing emitted was a repetition operator (and lazy).
        self.after_repeat = False

    def translate(self) -> str:
        p, out = self.p, self.out
        while self.i < len(p):
            ch = p[self.i]
            repeat = False
            if ch == "\\":
                self.escape()
            elif ch == "[":
                self.char_class()
            elif ch == "(":
                self.group()
            elif ch == ")":
                self.close_group()
            elif ch == "|":
                frame = self.frames[-1]
                out.append(")" * len(frame.wrappers) + "|" + "".join(frame.wrappers))
                self.i += 1
            elif ch == "$":
                out.append("$" if self.frames[-1].multiline else r"\Z")
                self.i += 1
            elif ch in "*+?":
                if self.after_repeat and ch == "+":
                    raise _RegexError(f"invalid nested repetition operator: `{p[self.i - 1]}+`")
                repeat = not (self.after_repeat and ch == "?")  # a lazy suffix ends it
                out.append(ch)
                self.i += 1
            elif ch == "{":
                repeat = self.repeat()
            else:
                out.append(ch)
                self.i += 1
            self.after_repeat = repeat
        out.append(")" * len(self.frames[0].wrappers))
        return "".join(out)

    def repeat(self) -> bool:
        m = _REPEAT.match(self.p, self.i)
        if not m:
            self.out.append(r"\{")  # not a repetition: a literal brace, as in RE2
            self.i += 1
            return False
        low, high = m.groups()
        if int(low) > _MAX_REPEAT or (high and int(high) > _MAX_REPEAT):
            raise _RegexError(f"invalid repeat count: `{m.group()}`")
        if high and int(high) < int(low):
            raise _RegexError(f"invalid repeat count: `{m.group()}`")
        if self.after_repeat:
            raise _RegexError(f"invalid nested repetition operator: `{m.group()}`")
        self.out.append(m.group())
        self.i = m.end()
        return True

    def push(self, opening: str, multiline: bool) -> None:
        self.depth += 1
        if self.depth > _MAX_NESTING:
            raise _RegexError("expression nests too deeply")
        self.out.append(opening)
        self.frames.append(_Frame(multiline))

    def group(self) -> None:
        p, frame = self.p, self.frames[-1]
        if not p.startswith("(?", self.i):
            self.push("(", frame.multiline)
            self.i += 1
            return
        named = _NAMED.match(p, self.i)
        if named and not p.startswith(("(?<=", "(?<!"), self.i):
            self.push(f"(?P<{named.group(1)}>", frame.multiline)
            self.i = named.end()
            return
        flags = _FLAGS.match(p, self.i)
        if not flags:
            raise _RegexError(f"invalid or unsupported Perl syntax: `{p[self.i : self.i + 3]}`")
        on, off, end = flags.groups()
        if off is not None and not off:
            raise _RegexError(f"missing flags after `-`: `{flags.group()}`")
        for letter in on + (off or ""):
            if letter == "U":
                raise _RegexError("the ungreedy flag (?U) is not supported")
            if letter not in "ims":
                raise _RegexError(f"invalid or unsupported Perl syntax: `{flags.group()}`")
        spec = on + ("-" + off if off else "")
        multiline = frame.multiline
        if "m" in on:
            multiline = True
        elif off and "m" in off:
            multiline = False
        self.i = flags.end()
        if end == ":":
            self.push(f"(?{spec}:" if spec else "(?:", multiline)
            return
        if not spec:
            raise _RegexError("missing flags: `(?)`")
        # (?flags) holds until the end of the enclosing group: wrap the rest
        # of it (each alternative separately) in a scoped (?flags:...).
        self.depth += 1
        if self.depth > _MAX_NESTING:
            raise _RegexError("expression nests too deeply")
        wrapper = f"(?{spec}:"
        frame.wrappers.append(wrapper)
        frame.multiline = multiline
        self.out.append(wrapper)

    def close_group(self) -> None:
        self.i += 1
        if len(self.frames) == 1:
            raise _RegexError("unexpected )")
        frame = self.frames.pop()
        self.depth -= 1 + len(frame.wrappers)
        self.out.append(")" * len(frame.wrappers) + ")")

    def escape(self) -> None:
        p, i = self.p, self.i
        if i + 1 >= len(p):
            raise _RegexError("trailing backslash at end of expression")
        c = p[i + 1]
        simple = {"A": r"\A", "z": r"\Z", "b": _BOUNDARY, "B": _NON_BOUNDARY}.get(c)
        if simple is not None:
            self.out.append(simple)
            self.i = i + 2
        elif c == "Q":
            end = p.find(r"\E", i + 2)
            literal = p[i + 2 :] if end < 0 else p[i + 2 : end]
            self.out.append("".join(_lit(ord(x)) for x in literal))
            self.i = len(p) if end < 0 else end + 2
        elif c in "dDwWsS":
            ranges = _PERL[c.lower()]
            self.out.append(f"[{'^' if c.isupper() else ''}{_class_items(ranges)}]")
            self.i = i + 2
        elif c in "pP":
            raise _RegexError(f"Unicode character classes are not supported: `\\{c}`")
        else:
            code, self.i = self.escaped_char(i)
            self.out.append(_lit(code))

    def escaped_char(self, i: int) -> tuple[int, int]:
        """Decode the RE2 escape of one character at p[i] (a backslash)."""
        p = self.p
        if i + 1 >= len(p):
            raise _RegexError("trailing backslash at end of expression")
        c = p[i + 1]
        if c < "\x80" and not c.isalnum():
            return ord(c), i + 2
        if c in "1234567" and not (i + 2 < len(p) and p[i + 2] in _OCTAL):
            raise _RegexError(f"invalid escape sequence: `\\{c}` (back-references are not supported)")
        if c in _OCTAL:
            j = i + 2
            while j < len(p) and j < i + 4 and p[j] in _OCTAL:
                j += 1
            return int(p[i + 1 : j], 8), j
        if c == "x":
            if i + 2 < len(p) and p[i + 2] == "{":
                end = p.find("}", i + 3)
                digits = p[i + 3 : end] if end > 0 else ""
                if not digits or not all(d in _HEX for d in digits) or int(digits, 16) > _MAX_RUNE:
                    raise _RegexError(f"invalid escape sequence: `{p[i : end + 1 if end > 0 else len(p)]}`")
                return int(digits, 16), end + 1
            digits = p[i + 2 : i + 4]
            if len(digits) < 2 or not all(d in _HEX for d in digits):
                raise _RegexError(f"invalid escape sequence: `{p[i : i + 4]}`")
            return int(digits, 16), i + 4
        code = {"a": 7, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11}.get(c)
        if code is None:
            raise _RegexError(f"invalid escape sequence: `\\{c}`")
        return code, i + 2

    def char_class(self) -> None:
        p = self.p
        start = self.i
        i = start + 1
        negate = i < len(p) and p[i] == "^"
        if negate:
            i += 1
        items: _Ranges = []
        first = True
        while True:
            if i >= len(p):
                raise _RegexError(f"missing closing ]: `{p[start:]}`")
            c = p[i]
            if c == "]" and not first:
                i += 1
                break
            first = False
            if c == "[" and p.startswith("[:", i):
                end = p.find(":]", i + 2)
                if end >= 0:
                    name = p[i + 2 : end]
                    negated = name.startswith("^")
                    ranges = _POSIX.get(name.lstrip("^"))
                    if ranges is None:
                        raise _RegexError(f"invalid character class range: `{p[i : end + 2]}`")
                    items += _complement(ranges) if negated else ranges
                    i = end + 2
                    continue
            if c == "\\" and i + 1 < len(p) and p[i + 1] in "dDwWsSpP":
                e = p[i + 1]
                if e in "pP":
                    raise _RegexError(f"Unicode character classes are not supported: `\\{e}`")
                ranges = _PERL[e.lower()]
                items += _complement(ranges) if e.isupper() else ranges
                i += 2
                continue
            item_start = i
            lo, i = self.class_char(i)
            hi = lo
            if i + 1 < len(p) and p[i] == "-" and p[i + 1] != "]":
                hi, i = self.class_char(i + 1)
                if hi < lo:
                    raise _RegexError(f"invalid character class range: `{p[item_start:i]}`")
            items.append((lo, hi))
        self.out.append(f"[{'^' if negate else ''}{_class_items(items)}]")
        self.i = i

    def class_char(self, i: int) -> tuple[int, int]:
        if self.p[i] == "\\":
            return self.escaped_char(i)
        return ord(self.p[i]), i + 1
