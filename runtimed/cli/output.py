"""Output for people (aligned tables, human sizes and times) and for scripts (`--format json`)."""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
COLUMN_GAP = "   "


def add_format_options(parser: argparse.ArgumentParser, *, quiet: str | None = None) -> None:
    """--format table|json, and --quiet/-q when quiet names what is printed (e.g. "container IDs")."""
    parser.add_argument(
        "--format", choices=("table", "json"), default="table", help="output format (default: table)"
    )
    if quiet:
        parser.add_argument("-q", "--quiet", action="store_true", help=f"only print {quiet}")


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Columns padded to their widest cell, like docker and ctr."""
    cells = [list(headers)] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        line = COLUMN_GAP.join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print(line.rstrip())


def print_json(value: object) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def render(
    args: argparse.Namespace,
    items: Sequence[Any],
    headers: Sequence[str],
    row: Callable[[Any], Sequence[object]],
    to_dict: Callable[[Any], dict[str, Any]],
    ident: Callable[[Any], str] | None = None,
) -> None:
    """The usual listing: ids with -q, a JSON array with --format json, else a table."""
    if ident is not None and getattr(args, "quiet", False):
        for item in items:
            print(ident(item))
    elif args.format == "json":
        print_json([to_dict(item) for item in items])
    else:
        print_table(headers, (row(item) for item in items))


def message_dict(message: Any) -> dict[str, Any]:
    """A protobuf message as JSON-ready data with proto field names and every scalar present."""
    from google.protobuf import json_format

    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def any_dict(value: Any) -> Any:
    """An Any for people: an OCI spec decoded from its JSON, a known message as JSON, else base64."""
    from google.protobuf import json_format

    if value.type_url == SPEC_TYPE_URL:
        try:
            return json.loads(value.value or b"null")
        except ValueError:
            pass
    else:
        try:
            return json_format.MessageToDict(value, preserving_proto_field_name=True)
        except (TypeError, KeyError, json_format.Error):
            pass  # a type this client does not know
    return {"@type": value.type_url, "value": base64.b64encode(value.value).decode()}


def labels_text(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def human_size(size: float) -> str:
    """Decimal units with 4 significant digits, as docker prints sizes: 1.536kB, 42.1MB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000:
            return f"{size:.4g}{unit}"
        size /= 1000
    return f"{size:.4g}PB"


def human_duration(seconds: float) -> str:
    """docker's go-units HumanDuration: "Less than a second", "About a minute", "3 weeks"."""
    if seconds < 1:
        return "Less than a second"
    if seconds < 2:
        return "1 second"
    minutes, hours, days = seconds / 60, seconds / 3600, seconds / 86400
    if minutes < 1:
        return f"{int(seconds)} seconds"
    if minutes < 2:
        return "About a minute"
    if hours < 1:
        return f"{int(minutes)} minutes"
    if hours < 2:
        return "About an hour"
    if hours < 48:
        return f"{int(hours)} hours"
    if days < 14:
        return f"{int(days)} days"
    if days < 90:
        return f"{int(days // 7)} weeks"
    if days < 730:
        return f"{int(days // 30)} months"
    return f"{int(days // 365)} years"


def ago(message: Any, field: str = "created_at") -> str:
    """ "3 minutes ago" for a Timestamp field, "-" when unset."""
    if not message.HasField(field):
        return "-"
    stamp = getattr(message, field)
    return human_duration(max(0.0, time.time() - stamp.seconds - stamp.nanos / 1e9)) + " ago"
