"""Go-template-ish `--format` for people used to docker: `{{.Name}}`, `{{.State.Pid}}`,
`{{json .Config}}`, `{{upper .Status}}`, a `table ` prefix for aligned columns with headers, and
`\\t`/`\\n` escapes. Only field paths and those functions are supported; anything else is an error."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from runtimed.cli.common import CLIError
from runtimed.cli.output import print_table

_ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}")
_FUNCTIONS = {"json", "upper", "lower", "title", "len"}


def _lookup(data: Any, path: str) -> Any:
    if path == ".":
        return data
    value = data
    for part in path.lstrip(".").split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        else:
            raise CLIError(f"template: can't evaluate field {part} in {path}")
    return value


def _text(value: Any) -> str:
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "map[" + " ".join(f"{k}:{_text(v)}" for k, v in sorted(value.items())) + "]"
    if isinstance(value, list):
        return "[" + " ".join(_text(v) for v in value) + "]"
    return str(value)


def _evaluate(expression: str, data: Any) -> str:
    words = expression.split()
    if not words:
        raise CLIError("template: empty action")
    if len(words) == 1 and words[0].startswith("."):
        return _text(_lookup(data, words[0]))
    if len(words) == 2 and words[0] in _FUNCTIONS and words[1].startswith("."):
        value = _lookup(data, words[1])
        function = words[0]
        if function == "json":
            return json.dumps(value)
        if function == "len":
            return str(len(value))
        return getattr(_text(value), function)()
    raise CLIError(f"template: unsupported action {{{{{expression}}}}}")


def render(template: str, data: Any) -> str:
    template = template.replace("\\t", "\t").replace("\\n", "\n")
    return _ACTION.sub(lambda m: _evaluate(m.group(1), data), template)


def print_formatted(template: str, items: Sequence[Any]) -> None:
    """Each item through the template; `table ...` prints aligned columns under their field names."""
    if template.startswith("table"):
        body = template[len("table") :].strip()
        cells = [render(body, item).split("\t") for item in items]
        headers = [
            (m.group(1).split()[-1].lstrip(".").split(".")[-1] or "VALUE").upper()
            for m in _ACTION.finditer(body.replace("\\t", "\t"))
        ]
        if len(headers) < max((len(c) for c in cells), default=0):
            headers += [""] * (max(len(c) for c in cells) - len(headers))
        width = len(headers)
        print_table(headers, [c + [""] * (width - len(c)) for c in cells])
        return
    for item in items:
        print(render(template, item))
