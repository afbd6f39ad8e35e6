"""Reading /proc/self/mountinfo: the one parser of its escaped fields."""

from __future__ import annotations

MOUNTINFO = "/proc/self/mountinfo"


def unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as \\ooo (three octal digits)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        digits = field[i + 1 : i + 4]
        if field[i] == "\\" and len(digits) == 3 and digits.isdigit():
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)
