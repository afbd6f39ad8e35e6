"""Variable substitution in Dockerfile words, as docker's shell lexer does it (moby/buildkit shell/lex.go).

    process_word('${NAME:-x}/"a b"', env)    -> the word with quotes removed and variables replaced
    process_words('80 ${PORT}/udp', env)     -> the words, split on unquoted white space

Supported: `$NAME`, `${NAME}`, `${NAME:-word}`, `${NAME-word}`, `${NAME:+word}`, `${NAME+word}`,
`${NAME:?message}`, `${NAME?message}`; single quotes (nothing inside is special), double quotes
(the escape character escapes `"`, `$` and itself), and the escape character (`\\` or the
`# escape=` directive's) before any character. An unset variable is the empty string, as in docker.
"""

from __future__ import annotations

from collections.abc import Mapping

from runtimed.errors import InvalidArgument


class SubstitutionError(InvalidArgument):
    pass


class _Lexer:
    def __init__(self, text: str, env: Mapping[str, str], escape: str) -> None:
        self.text = text
        self.pos = 0
        self.env = env
        self.escape = escape

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def next(self) -> str:
        ch = self.peek()
        self.pos += 1 if ch else 0
        return ch

    def words(self, split: bool, stop: str = "") -> list[str]:
        words: list[str] = []
        current: list[str] = []
        in_word = False
        while self.pos < len(self.text):
            ch = self.peek()
            if stop and ch == stop:
                break
            if ch == "'":
                self.next()
                current.append(self._single_quoted())
                in_word = True
            elif ch == '"':
                self.next()
                current.append(self._double_quoted())
                in_word = True
            elif ch == "$":
                current.append(self._dollar())
                in_word = True
            elif ch == self.escape:
                self.next()
                following = self.next()
                current.append(following if following else self.escape)
                in_word = True
            elif split and ch in " \t\r\n":
                self.next()
                if in_word:
                    words.append("".join(current))
                    current, in_word = [], False
            else:
                current.append(self.next())
                in_word = True
        if in_word or not split:
            words.append("".join(current))
        return words

    def _single_quoted(self) -> str:
        end = self.text.find("'", self.pos)
        if end < 0:
            raise SubstitutionError(
                f"unexpected end of statement while looking for matching single-quote in {self.text!r}"
            )
        value = self.text[self.pos : end]
        self.pos = end + 1
        return value

    def _double_quoted(self) -> str:
        out: list[str] = []
        while True:
            ch = self.next()
            if not ch:
                raise SubstitutionError(
                    f"unexpected end of statement while looking for matching double-quote in {self.text!r}"
                )
            if ch == '"':
                return "".join(out)
            if ch == "$":
                self.pos -= 1
                out.append(self._dollar())
            elif ch == self.escape:
                following = self.next()
                if following in ('"', "$", self.escape):
                    out.append(following)
                else:
                    out.append(ch + following)
            else:
                out.append(ch)

    def _name(self) -> str:
        start = self.pos
        if self.peek().isdigit():  # $1 and the like: one character
            self.pos += 1
            return self.text[start : self.pos]
        while self.peek() and (self.peek().isalnum() or self.peek() == "_"):
            self.pos += 1
        return self.text[start : self.pos]

    def _dollar(self) -> str:
        self.next()  # the $
        if self.peek() != "{":
            name = self._name()
            return "$" if not name else self.env.get(name, "")
        self.next()
        name = self._name()
        if not name:
            raise SubstitutionError(f"bad substitution in {self.text!r}")
        ch = self.next()
        if ch == "}":
            return self.env.get(name, "")
        colon = ch == ":"
        if colon:
            ch = self.next()
        if ch not in ("-", "+", "?"):
            raise SubstitutionError(
                f"unsupported modifier ({ch or 'end of text'}) in substitution {self.text!r}"
            )
        word = self.words(split=False, stop="}")[0]
        if self.next() != "}":
            raise SubstitutionError(f"missing '}}' in substitution {self.text!r}")
        present = name in self.env and (not colon or self.env[name] != "")
        if ch == "-":
            return self.env[name] if present else word
        if ch == "+":
            return word if present else ""
        if not present:
            raise SubstitutionError(f"{name}: {word or 'is not allowed to be unset'}")
        return self.env[name]


def process_word(text: str, env: Mapping[str, str], escape: str = "\\") -> str:
    """One word: quotes removed, variables substituted."""
    return _Lexer(text, env, escape).words(split=False)[0]


def process_words(text: str, env: Mapping[str, str], escape: str = "\\") -> list[str]:
    """Words split on unquoted white space, each processed as process_word does."""
    return _Lexer(text, env, escape).words(split=True)


def split_words(text: str, escape: str = "\\") -> list[str]:
    """Split on unquoted white space keeping quotes and escapes (docker's parseWords): the raw words."""
    words: list[str] = []
    current: list[str] = []
    quote = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == escape and i + 1 < len(text) and quote != "'":
            current.append(ch + text[i + 1])
            i += 2
            continue
        if quote:
            if ch == quote:
                quote = ""
            current.append(ch)
        elif ch in ("'", '"'):
            quote = ch
            current.append(ch)
        elif ch in " \t\r\n":
            if current:
                words.append("".join(current))
                current = []
        else:
            current.append(ch)
        i += 1
    if current:
        words.append("".join(current))
    return words
