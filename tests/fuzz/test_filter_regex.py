"""Regex filters (`~=`) cannot stall the daemon, and the linear-time matcher agrees with `re`.

Python's `re` backtracks: `(a|a)*b` took 25 s on 28 characters and `.*.*x` 7 s on a 4 KiB label,
holding the GIL, so one `ctr containers ls 'labels.a~=(a|a)*b'` froze the whole daemon.
runtimed.filters now runs any pattern with more than one choice point on a Pike VM (linear in
the text); these tests bound its time and check it against `re` on patterns hypothesis builds.
"""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from runtimed import filters
from runtimed.errors import InvalidArgument

PATHOLOGICAL = [
    "(a|a)*b",
    "(a*)*b",
    "(a+)+$",
    ".*.*.*x",
    "a*a*a*a*b",
    "(a?){30}a{30}",
    "(?:a|aa)*c",
    "(x+x+)+y",
    r"(\w+\s?)*$!",
]


@pytest.mark.parametrize("pattern", PATHOLOGICAL)
def test_pathological_patterns_are_fast(pattern):
    matcher = filters.parse(f'labels.k~="{pattern.replace(chr(92), chr(92) * 2)}"')
    adaptor = filters.adaptor_for({}, {"k": "a" * 4000})
    started = time.monotonic()
    matcher.match(adaptor)
    assert time.monotonic() - started < 2.0


def test_huge_programs_are_refused():
    with pytest.raises(InvalidArgument, match="expression too large"):
        filters.parse("name~=(?:(?:a{1000}){1000}|b)x*y*")


# -- the Pike VM against re on small patterns ----------------------------------------------------

ATOMS = st.sampled_from(["a", "b", ".", "[ab]", "[^a]", "(?i:A)", r"\b", "^", "$", r"\d", "x"])


def _patterns(depth: int = 2) -> st.SearchStrategy[str]:
    if depth == 0:
        return ATOMS
    inner = _patterns(depth - 1)
    return st.one_of(
        ATOMS,
        st.lists(inner, min_size=1, max_size=3).map("".join),
        st.tuples(inner, inner).map(lambda p: f"(?:{p[0]}|{p[1]})"),
        st.tuples(inner, st.sampled_from(["*", "+", "?", "{2}", "{1,3}", "*?"])).map(
            lambda p: f"(?:{p[0]}){p[1]}"
        ),
    )


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(pattern=_patterns(), text=st.text(alphabet="abx1 A\n", max_size=10))
@example(pattern="(?:a|a)*b", text="aaab")
@example(pattern=r"\bab\b", text="x ab")
@example(pattern="(?i:A)(?:b|a)+$", text="aab")
def test_pike_vm_agrees_with_re(pattern, text):
    try:
        translated = filters._Re2Translator(pattern).translate()
        expected = re.compile(translated).search(text) is not None
    except (filters._RegexError, re.error):
        return
    vm = filters._PikeVM(filters._sre_parser.parse(translated))
    assert (vm.search(text) is not None) == expected, (pattern, translated, text)
