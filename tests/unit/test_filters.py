"""containerd's filter syntax (runtimed.filters): parsing, matching, errors and adaptors."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtimed import filters
from runtimed.errors import InvalidArgument
from runtimed.filters import ALWAYS, MAX_FILTER_LENGTH, adaptor_for, parse, parse_all

# A small corpus of records: (name, other, labels).
CORPUS: dict[str, tuple[str, str, dict[str, str]]] = {
    "foo": ("foo", "", {"foo": "true"}),
    "bar": ("bar", "", {}),
    "foo-complex": ("foo", "", {"foo": "present", "more complex label": "present"}),
    "bar-labelled": ("bar", "", {"bar": "true"}),
    "escaped-key": ("fooer", "", {'key with \\ and "': "present"}),
    "dotted-key": ("fooer", "", {"a.b": "c", "com.example/k": "v"}),
    "spaces": ("baz", "too complex, yo", {}),
    "abc": ("bazo", "abc", {}),
    "punctuated": ("compound", "", {"foo": "omg_asdf.asdf-qwer"}),
    "empty-label": ("e", "", {"x": ""}),
    "special": ("a+b", "f(o)o.*[x]", {"re": "^start$"}),
    "unicode": ("牛", "é", {"x": "y"}),
}


def adapt(record: tuple[str, str, dict[str, str]]) -> filters.Adaptor:
    name, other, labels = record
    return adaptor_for({"name": name, "other": other}, labels)


def matching(expr: str) -> set[str]:
    f = parse(expr)
    return {key for key, record in CORPUS.items() if f.match(adapt(record))}


ALL = set(CORPUS)


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("", ALL),
        ("name", ALL),
        ("other", {"spaces", "abc", "special", "unicode"}),
        ("missing", set()),
        ("labels.foo", {"foo", "foo-complex", "punctuated"}),
        ("labels.foo,name", {"foo", "foo-complex", "punctuated"}),
        ("labels.foo==true", {"foo"}),
        ("labels.foo==omg_asdf.asdf-qwer", {"punctuated"}),
        ("name==bar", {"bar", "bar-labelled"}),
        ("name==foo", {"foo", "foo-complex"}),
        ("name!=foo", ALL - {"foo", "foo-complex"}),
        ("missing!=x", ALL),  # an absent field is "" for !=
        ('missing!=""', set()),
        ("name~=^f", {"foo", "foo-complex", "escaped-key", "dotted-key"}),
        ("name~=oo", {"foo", "foo-complex", "escaped-key", "dotted-key"}),  # unanchored search
        ("name~=^foo$", {"foo", "foo-complex"}),
        ("missing~=^$", ALL),  # an absent field is matched as ""
        ("name==bar,labels.bar", {"bar-labelled"}),
        ("name==bar,labels.bar==true", {"bar-labelled"}),
        ("name==bar,labels.bar==wrong", set()),
        ('other=="too complex, yo"', {"spaces"}),
        ("other~=[abc]+,name!=foo", {"spaces", "abc"}),
        ("other~=/[abc]+/,name!=foo", {"spaces", "abc"}),
        ("other~=/[abc]{1,2}/,name!=foo", {"spaces", "abc"}),
        ('other~=/[abc]{0,1}"\\//,name!=foo', set()),  # valid, matches nothing
        ("other~=|x, y|", {"spaces"}),
        ('name==foo,labels."more complex label"', {"foo-complex"}),
        ('labels."key with \\\\ and \\""==present', {"escaped-key"}),
        ('labels."a.b"==c', {"dotted-key"}),
        ("labels.a.b==c", {"dotted-key"}),  # the rest of the path is joined with "."
        ('labels."com.example/k"==v', {"dotted-key"}),
        ('labels."com.example/k"', {"dotted-key"}),
        ('"name"==foo', {"foo", "foo-complex"}),
        ('labels.x==""', {"empty-label"}),  # present with an empty value
        ("labels.x", {"empty-label", "unicode"}),
        ('labels."x"!=""', {"unicode"}),
        ("name==a+b", {"special"}),
        ("name~=^a\\+b$", {"special"}),
        ("other~=\\(o\\)o\\.\\*\\[x\\]", {"special"}),
        ('other=="f(o)o.*[x]"', {"special"}),
        ("labels.re==^start$", {"special"}),
        ("labels.re~=\\^start\\$", {"special"}),
        ("name==牛", {"unicode"}),
        ('other=="\\u00e9"', {"unicode"}),
        ('other=="\\xc3\\xa9"', {"unicode"}),  # bytes that are UTF-8
        ('other=="\\303\\251"', {"unicode"}),  # octal bytes
        ("name~=(?i)^FOO$", {"foo", "foo-complex"}),
        ("name~=^(bar|baz)$", {"bar", "bar-labelled", "spaces"}),
        # No || in containerd's grammar: it is part of the value.
        ("name==foo||name==bar", set()),
        ("name == foo", {"foo", "foo-complex"}),  # spaces around the operator
        ("name==foo, labels.foo==true", {"foo"}),  # and after a comma
    ],
)
def test_match(expr: str, expected: set[str]) -> None:
    assert matching(expr) == expected


def test_or_is_not_an_operator() -> None:
    f = parse("name==a||name==b")
    assert f.match(adaptor_for({"name": "a||name==b"}))
    assert not f.match(adaptor_for({"name": "a"}))
    assert not f.match(adaptor_for({"name": "b"}))


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("name==", "[name==]: expected value or quoted"),
        ("==foo", "[ >|=|< =foo]: expected field or quoted"),
        ("name=foo", '[name >|=|< foo]: unsupported operator "="'),
        ("name===foo", '[name >|=|< ==foo]: unsupported operator "==="'),
        ("name=~foo", '[name >|=|< ~foo]: unsupported operator "=~"'),
        ("name==foo,", "[name==foo,]: expected field or quoted"),
        (",name", "[ >|,|< name]: expected field or quoted"),
        ("name==foo,,x", "[name==foo, >|,|< x]: expected field or quoted"),
        ("labels.", "[labels.]: expected field or quoted"),
        ("labels..x", "[labels. >|.|< x]: expected field or quoted"),
        ("   ", "[   ]: expected field or quoted"),
        ("image~=,id==x", "[image~= >|,|< id==x]: expected value or quoted"),
        ("name==foo bar", "[name==foo >| |< bar]: unexpected input:  "),
        ("name==foo ,x", "[name==foo >| |< ,x]: unexpected input:  "),
        ("name ,x", '[name  >|,|< x]: expected an operator ("=="|"!="|"~=")'),
        ("name foo", '[name  >|f|< oo]: expected an operator ("=="|"!="|"~=")'),
        ('name=="foo"x', '[name=="foo" >|x|< ]: unexpected input: x'),
        ('labels."unterminated', '[labels. >|"|< unterminated]: quoted literal not terminated'),
        ('name=="unterminated', '[name== >|"|< unterminated]: quoted literal not terminated'),
        ('labels."a\nb"', '[labels. >|"|< a\nb"]: quoted literal not terminated'),
        ("labels.ns/key==value", "[labels.ns >|/|< key==value]: quoted literal not terminated"),
        ("labels.key==/value", "[labels.key== >|/|< value]: quoted literal not terminated"),
        ("labels.|foo|==x", "[labels. >|||< foo|==x]: invalid quote encountered"),
        ("name==/foo/", "[name== >|/|< foo/]: invalid quote encountered"),
        ("name!=|foo|", "[name!= >|||< foo|]: invalid quote encountered"),
        ('labels."\\g"', '[labels. >|"|< \\g"]: illegal escape sequence'),
        ('labels."\\xaz"', '[labels. >|"|< \\xaz"]: illegal numeric escape sequence'),
        ('name=="\\777"', '[name== >|"|< \\777"]: unquoting failed: quote syntax error'),
        ('name=="\\UFFFFFFFF"', '[name== >|"|< \\UFFFFFFFF"]: unquoting failed: quote syntax error'),
        ("name~=/a\\d/", "[name~= >|/|< a\\d/]: illegal escape sequence"),  # Go escapes, not regex ones
        ('labels.?"x"==y', '[labels. >|?|< "x"==y]: expected field or quoted'),
        ("labels.é==y", "[labels. >|é|< ==y]: expected field or quoted"),
        ("foo\x00bar", "[foo >|\x00|< bar]: unexpected null"),
        ("name==foo\x00", "[name==foo >|\x00|< ]: unexpected input: \ufffd"),
        ("name==\ufffd", "[name== >|\ufffd|< ]: rune error"),
        ("name~=(", '[name~= >|(|< ]: invalid regular expression "(": missing ), unterminated subpattern'),
        ("name~=[a-", '[name~= >|[|< a-]: invalid regular expression "[a-": missing closing ]: `[a-`'),
        ("name~=a**", '[name~= >|a|< **]: invalid regular expression "a**": multiple repeat'),
        (
            "name~=/[z-a]/",
            '[name~= >|/|< [z-a]/]: invalid regular expression "[z-a]": invalid character class range: `z-a`',
        ),
    ],
)
def test_parse_errors(expr: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse(expr)
    assert str(info.value) == f"filters: parse error: {message}: invalid argument"


@pytest.mark.parametrize(
    "pattern",
    [
        "a(?=b)",  # look-ahead: not RE2
        "a(?!b)",
        "(?<=a)b",  # look-behind
        "(?<!a)b",
        "(a)\\1",  # back-reference
        "(?P<x>a)(?P=x)",
        "(?>a)",  # atomic group
        "a*+",  # possessive
        "a{2}+",
        "(?#comment)",
        "(?x)a b",
        "(?U)a+",  # ungreedy: RE2 only, unsupported here
        "\\pL",  # Unicode classes: unsupported here
        "\\Z",
        "\\u00e9",  # Python-only escapes
        "\\N{DASH}",
        "\\8",
        "a{1001}",  # RE2's repeat limit
        "[[:nope:]]",
        "((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((" * 4,
        "a)",
        "\\",
    ],
)
def test_regex_outside_re2_rejected(pattern: str) -> None:
    quoted = "/" + pattern.replace("\\", "\\\\").replace("/", "\\/") + "/"
    with pytest.raises(InvalidArgument, match="invalid regular expression"):
        parse(f"name~={quoted}")


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        ("^foo$", ["foo"], ["foo\n", "xfoo"]),  # RE2's $ is the end of the text
        ("(?m)^foo$", ["foo\nbar", "bar\nfoo"], ["foox"]),
        ("a\\z", ["ba"], ["a\n"]),
        ("\\Qa.b\\E", ["xa.b"], ["axb"]),
        ("\\x{1F600}", ["\U0001f600"], ["x"]),
        ("\\x41\\101", ["AA"], ["A"]),
        ("^[[:alpha:]]+$", ["abcXYZ"], ["ab1", "é"]),
        ("^[[:^digit:]]+$", ["abc"], ["a1"]),
        ("^\\d+$", ["123"], ["١٢٣"]),  # ASCII digits only, as in RE2
        ("^\\w+$", ["a_1"], ["é"]),
        ("^\\s$", [" ", "\t"], ["\v", "\xa0"]),
        ("\\bfoo\\b", ["a foo b", "éfooé"], ["afoob"]),  # é is not an ASCII word character
        ("a{,2}", ["a{,2}"], ["aa"]),  # not a repetition in RE2
        ("(?i)ab|c", ["AB", "C"], ["x"]),
        ("x(?i)y|z", ["xY", "Z"], ["XY"]),
        ("(?P<n>a)(?<m>b)", ["ab"], ["a"]),
        ("[]a]", ["]"], ["b"]),
        ("[!--]", [",", "!"], ["."]),
        ("[a&&b]", ["&"], ["c"]),
        ("(?s)a.b", ["a\nb"], ["ab"]),
        ("a.b", ["axb"], ["a\nb"]),
        ("é+", ["éé"], ["e"]),
        ("(?i)É", ["é"], ["e"]),
    ],
)
def test_re2_semantics(pattern: str, matches: list[str], misses: list[str]) -> None:
    quoted = "/" + pattern.replace("\\", "\\\\").replace("/", "\\/") + "/"
    f = parse(f"v~={quoted}")
    for value in matches:
        assert f.match(adaptor_for({"v": value})), (pattern, value)
    for value in misses:
        assert not f.match(adaptor_for({"v": value})), (pattern, value)


def test_regex_compiled_once(monkeypatch: pytest.MonkeyPatch) -> None:
    f = parse("name~=^c[0-9]+$,labels.tier~=web")
    compiled: list[str] = []
    real_compile = re.compile
    monkeypatch.setattr(re, "compile", lambda *a, **k: compiled.append(a[0]) or real_compile(*a, **k))
    records = [adaptor_for({"name": f"c{i}"}, {"tier": "web" if i % 2 else "db"}) for i in range(2000)]
    assert sum(f.match(a) for a in records) == 1000
    assert compiled == []


def test_length_bound() -> None:
    ok = "name==" + "x" * (MAX_FILTER_LENGTH - 6)
    assert parse(ok).match(adaptor_for({"name": "x" * (MAX_FILTER_LENGTH - 6)}))
    with pytest.raises(InvalidArgument, match=r"filter of 4097 characters is longer than 4096"):
        parse(ok + "x")


def test_parse_all() -> None:
    a = adaptor_for({"name": "a"})
    b = adaptor_for({"name": "b"})
    c = adaptor_for({"name": "c"})
    assert parse_all([]) is ALWAYS
    assert parse_all([""]) is ALWAYS
    assert parse_all(["name==a", ""]) is ALWAYS
    f = parse_all(["name==a", "name==b"])
    assert f.match(a) and f.match(b) and not f.match(c)
    f = parse_all(iter(["name==a"]))
    assert f.match(a) and not f.match(b)
    # Every filter must parse, even next to an empty one.
    with pytest.raises(InvalidArgument, match=r"\[name==\]: expected value or quoted: invalid argument$"):
        parse_all(["", "name=="])


def test_adaptor_for_fields() -> None:
    adaptor = adaptor_for({"id": "c1", "image": "", "runtime.name": "io.containerd.runc.v2"}, {"a.b": "1"})
    assert adaptor(["id"]) == ("c1", True)
    assert adaptor(["image"]) == ("", False)  # empty is not present
    assert adaptor(["missing"]) == ("", False)
    assert adaptor([]) == ("", False)
    assert adaptor(("runtime", "name")) == ("io.containerd.runc.v2", True)
    assert adaptor(["runtime"]) == ("", False)
    assert adaptor(["runtime.name"]) == ("", False)  # a quoted "runtime.name" is another path
    assert adaptor(["labels", "a", "b"]) == ("1", True)
    assert adaptor(["labels", "a.b"]) == ("1", True)
    assert adaptor(["labels", "a"]) == ("", False)
    assert adaptor(["labels"]) == ("", False)
    assert parse("runtime.name~=runc").match(adaptor)
    assert not parse('"runtime.name"~=runc').match(adaptor)


def test_adaptor_for_maps_and_presence() -> None:
    # images: target annotations under "annotations"; events: labels under "event.labels".
    image = adaptor_for(
        {"name": "docker.io/library/x:1", "target.digest": "sha256:ab", "target.mediatype": ""},
        {},
        annotations={"org.opencontainers.image.ref.name": "1"},
    )
    assert parse('annotations."org.opencontainers.image.ref.name"==1').match(image)
    assert not parse("labels").match(image)
    assert not parse("target.mediatype").match(image)
    assert parse("target.digest==sha256:ab").match(image)

    event = adaptor_for(
        {"topic": "/containers/update", "namespace": "default", "event.id": "c1"},
        **{"event.labels": {"k": "v"}},
    )
    assert parse('topic=="/containers/update",event.id==c1,event.labels.k==v').match(event)
    assert not parse("labels.k").match(event)

    # snapshots: name and parent are present even when empty.
    snapshot = adaptor_for({"kind": "committed", "name": "s1", "parent": ""}, None, always_present={"parent"})
    assert parse('parent==""').match(snapshot)
    assert parse("parent").match(snapshot)
    assert not parse("labels.x").match(snapshot)
    plain = adaptor_for({"kind": "committed", "name": "s1", "parent": ""})
    assert not parse("parent").match(plain)


def test_labels_empty_map_never_present() -> None:
    assert not parse("labels").match(adaptor_for({}, {}))
    assert parse("labels").match(adaptor_for({}, {"": "x"}))  # containerd joins [] to ""


def test_filters_are_reusable_and_typed() -> None:
    f = parse("name==foo,labels.x")
    assert f.match(adaptor_for({"name": "foo"}, {"x": "1"}))
    assert not f.match(adaptor_for({"name": "foo"}, {}))
    assert f.match(adaptor_for({"name": "foo"}, {"x": "1"}))
    with pytest.raises(InvalidArgument):
        parse(b"name==foo")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.text(max_size=40),
        st.text(alphabet='abn.,=!~"/|\\ \n\x00()[]*+?{}^$:-01', max_size=40),
        st.text(alphabet="ab1-\\()[]{},:^$|*+?.=!<>#PQEiImsUxzdwpb", max_size=30).map("v~=".__add__),
        st.lists(
            st.sampled_from(["name", "labels", ".", ",", "==", "!=", "~=", '"', "/", "|", "\\", "a", " "])
        ).map("".join),
    )
)
def test_parse_only_raises_invalid_argument(text: str) -> None:
    try:
        f = parse(text)
    except InvalidArgument:
        return
    f.match(adaptor_for({"name": "a"}, {"a": "b"}))
    parse_all([text, text])
