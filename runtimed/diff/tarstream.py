"""A lean streaming tar reader and a deterministic tar writer (ustar + PAX, as OCI layers use).

The reader understands ustar, GNU (long names `L`/`K`, base-256 numbers) and PAX (`x` records:
path, linkpath, size, uid, gid, mtime, atime, SCHILY.xattr.*); global PAX headers are skipped
like containerd does. Sparse files and multi-volume archives are refused. It parses headers itself
rather than through `tarfile`: per-entry overhead is what bounds extraction of many small files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from runtimed.errors import InvalidArgument

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
# Upper bound of a PAX or GNU long-name payload (Go's archive/tar uses the same).
MAX_SPECIAL_SIZE = 1 << 20

# Entry kinds (the tar typeflag, normalised).
REG = "0"
LINK = "1"
SYMLINK = "2"
CHR = "3"
BLK = "4"
DIR = "5"
FIFO = "6"

_KIND = {
    b"0": REG,
    b"\0": REG,
    b"7": REG,  # contiguous file
    b"1": LINK,
    b"2": SYMLINK,
    b"3": CHR,
    b"4": BLK,
    b"5": DIR,
    b"6": FIFO,
    b"D": DIR,  # GNU dump dir: a directory followed by a listing we ignore
}
_HEADER_ONLY = frozenset({LINK, SYMLINK, CHR, BLK, DIR, FIFO})
_UNSUPPORTED = {
    b"S": "GNU sparse file",
    b"M": "GNU multi-volume continuation",
    b"N": "GNU old long name",
}

NS = 1_000_000_000
USTAR_MAGIC = b"ustar\x0000"
XATTR_PREFIX = "SCHILY.xattr."


class TarEntry:
    __slots__ = (
        "atime_ns",
        "devmajor",
        "devminor",
        "gid",
        "kind",
        "linkname",
        "mode",
        "mtime_ns",
        "name",
        "size",
        "uid",
        "xattrs",
    )

    def __init__(self) -> None:
        self.name = ""
        self.kind = REG
        self.mode = 0
        self.uid = 0
        self.gid = 0
        self.size = 0
        self.mtime_ns = 0
        self.atime_ns = 0
        self.linkname = ""
        self.devmajor = 0
        self.devminor = 0
        self.xattrs: dict[str, bytes] | None = None

    def __repr__(self) -> str:
        return f"TarEntry({self.name!r}, kind={self.kind!r}, size={self.size})"


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _cstr(field: bytes) -> bytes:
    end = field.find(b"\0")
    return field if end < 0 else field[:end]


def _num(field: bytes, what: str) -> int:
    try:  # the common case: NUL- or space-terminated octal digits
        return int(field.rstrip(b"\0"), 8)
    except ValueError:
        return _num_slow(field, what)


def _num_slow(field: bytes, what: str) -> int:
    first = field[0]
    if first & 0x80:  # GNU base-256: 0x80 positive, 0xff negative (two's complement)
        if first == 0xFF:
            return int.from_bytes(field, "big", signed=True)
        return int.from_bytes(bytes([first & 0x7F]) + field[1:], "big")
    text = _cstr(field).strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise InvalidArgument(f"layer tar: invalid {what} field {field!r} in header") from None


def _pax_time(value: bytes) -> int:
    """A PAX time ("1700000000.123456789", possibly negative) in nanoseconds."""
    text = value.decode("ascii")
    negative = text.startswith("-")
    whole, _, frac = text.lstrip("-").partition(".")
    ns = int(whole or "0") * NS + int((frac + "000000000")[:9])
    return -ns if negative else ns


def parse_pax(data: bytes) -> dict[str, bytes]:
    records: dict[str, bytes] = {}
    pos = 0
    end = len(data)
    while pos < end:
        if data[pos] == 0:  # NUL padding after the last record
            break
        space = data.find(b" ", pos, pos + 20)
        if space < 0:
            raise InvalidArgument("layer tar: malformed PAX record")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise InvalidArgument("layer tar: malformed PAX record length") from None
        record_end = pos + length
        if length <= space - pos + 1 or record_end > end or data[record_end - 1] != 0x0A:
            raise InvalidArgument("layer tar: malformed PAX record")
        key, eq, value = data[space + 1 : record_end - 1].partition(b"=")
        if not eq:
            raise InvalidArgument("layer tar: malformed PAX record (no '=')")
        records[_decode(key)] = value
        pos = record_end
    return records


class TarReader:
    """Reads entries from a stream of chunks (`next_chunk()` returns b"" at the end).

    After `next()` returns an entry with data (a regular file with size > 0), the caller must
    consume exactly that data with `copy_data(fd)` or `skip_data()` before calling `next()` again.
    """

    def __init__(self, next_chunk: Callable[[], bytes]) -> None:
        self._next_chunk = next_chunk
        self._buf = b""
        self._view = memoryview(b"")
        self._pos = 0
        self._remaining = 0  # data bytes of the current entry not yet consumed
        self._padding = 0
        self.current = ""  # name of the entry being read, for error messages

    # -- low level -------------------------------------------------------------------------------
    def _refill(self) -> bool:
        chunk = self._next_chunk()
        self._buf = chunk
        self._view = memoryview(chunk)
        self._pos = 0
        return bool(chunk)

    def _read(self, n: int) -> bytes:
        """Exactly n bytes, or fewer at the end of the stream."""
        pos = self._pos
        end = pos + n
        if end <= len(self._buf):
            self._pos = end
            return self._buf[pos:end]
        parts = [self._buf[pos:]]
        have = len(parts[0])
        while have < n:
            if not self._refill():
                return b"".join(parts)
            take = min(n - have, len(self._buf))
            parts.append(self._buf[:take])
            self._pos = take
            have += take
        return b"".join(parts)

    def _skip(self, n: int) -> None:
        while n > 0:
            avail = len(self._buf) - self._pos
            if avail <= 0:
                if not self._refill():
                    raise self._truncated()
                continue
            step = min(avail, n)
            self._pos += step
            n -= step

    def _truncated(self) -> InvalidArgument:
        where = f" in entry {self.current!r}" if self.current else ""
        return InvalidArgument(f"layer tar: unexpected end of archive{where} (truncated layer)")

    def _read_exact(self, n: int) -> bytes:
        data = self._read(n)
        if len(data) != n:
            raise self._truncated()
        return data

    # -- data of the current entry ---------------------------------------------------------------
    def copy_data(self, fd: int) -> None:
        """Write the current entry's data to `fd`."""
        n = self._remaining
        write = os.write
        while n > 0:
            pos = self._pos
            avail = len(self._buf) - pos
            if avail <= 0:
                if not self._refill():
                    raise self._truncated()
                continue
            step = avail if avail < n else n
            view = self._view[pos : pos + step]
            written = write(fd, view)
            while written < step:  # short write: keep going (ENOSPC raises)
                written += write(fd, view[written:])
            self._pos = pos + step
            n -= step
        self._remaining = 0
        self._skip(self._padding)
        self._padding = 0

    def read_data(self) -> bytes:
        data = self._read_exact(self._remaining)
        self._remaining = 0
        self._skip(self._padding)
        self._padding = 0
        return data

    def skip_data(self) -> None:
        self._skip(self._remaining + self._padding)
        self._remaining = self._padding = 0

    def drain(self) -> None:
        """Consume the rest of the stream (after the end-of-archive marker)."""
        self._pos = len(self._buf)
        while self._refill():
            pass

    # -- headers ---------------------------------------------------------------------------------
    def _header(self) -> bytes | None:
        """The next 512-byte header, None at the end of the archive."""
        block = self._read(BLOCK)
        if len(block) < BLOCK:
            if not block:
                return None  # a clean end at a header boundary (Go's reader accepts it too)
            raise self._truncated()
        if block == ZERO_BLOCK:
            second = self._read(BLOCK)
            if not second or second == ZERO_BLOCK:
                return None
            raise InvalidArgument("layer tar: a zero block followed by data (corrupt archive)")
        checksum_field = block[148:156]
        stored = _num(checksum_field, "checksum")
        unsigned = sum(block) - sum(checksum_field) + 256
        if stored != unsigned:
            high = sum(1 for b in block[:148] if b > 127) + sum(1 for b in block[156:] if b > 127)
            signed = unsigned - 256 * high
            if stored != signed:
                raise InvalidArgument(
                    f"layer tar: header checksum mismatch after entry {self.current!r} (corrupt archive)"
                )
        return block

    def next(self) -> TarEntry | None:
        """The next file entry, or None at the end of the archive."""
        if self._remaining or self._padding:
            self.skip_data()
        pax: dict[str, bytes] | None = None
        long_name: bytes | None = None
        long_link: bytes | None = None
        while True:
            block = self._header()
            if block is None:
                if pax is not None or long_name is not None or long_link is not None:
                    raise self._truncated()
                return None
            flag = block[156:157]
            size = _num(block[124:136], "size")
            if flag in (b"x", b"g", b"L", b"K"):
                if size < 0 or size > MAX_SPECIAL_SIZE:
                    raise InvalidArgument(f"layer tar: extended header of {size} bytes is too large")
                data = self._read_exact(size)
                self._skip(-size % BLOCK)
                if flag == b"x":
                    records = parse_pax(data)
                    pax = records if pax is None else {**pax, **records}
                elif flag == b"L":
                    long_name = _cstr(data)
                elif flag == b"K":
                    long_link = _cstr(data)
                # b"g": global PAX headers are ignored, as containerd does
                continue
            return self._entry(block, flag, size, pax, long_name, long_link)

    def _entry(
        self,
        block: bytes,
        flag: bytes,
        size: int,
        pax: dict[str, bytes] | None,
        long_name: bytes | None,
        long_link: bytes | None,
    ) -> TarEntry:
        entry = TarEntry()
        if long_name is not None:
            name = long_name
        else:
            name = _cstr(block[0:100])
            if block[257:265] == USTAR_MAGIC:
                prefix = _cstr(block[345:500])
                if prefix:
                    name = prefix + b"/" + name
        entry.name = _decode(name)
        self.current = entry.name
        kind = _KIND.get(flag)
        if kind is None:
            what = _UNSUPPORTED.get(flag, f"type {flag!r}")
            if flag == b"V":  # a volume label: skip it like an unknown header
                kind = "V"
            else:
                raise InvalidArgument(f"layer tar: entry {entry.name!r}: unsupported entry ({what})")
        if flag == b"\0" and name.endswith(b"/"):
            kind = DIR
        entry.kind = kind
        entry.mode = _num(block[100:108], "mode")
        entry.uid = _num(block[108:116], "uid")
        entry.gid = _num(block[116:124], "gid")
        mtime = _num(block[136:148], "mtime") * NS
        atime = 0
        linkname = long_link if long_link is not None else _cstr(block[157:257])
        entry.linkname = _decode(linkname) if linkname else ""
        if kind in (CHR, BLK):
            entry.devmajor = _num(block[329:337], "devmajor")
            entry.devminor = _num(block[337:345], "devminor")
        if pax is not None:
            try:
                for key, value in pax.items():
                    if key.startswith(XATTR_PREFIX):
                        if entry.xattrs is None:
                            entry.xattrs = {}
                        entry.xattrs[key[len(XATTR_PREFIX) :]] = value
                    elif key == "path":
                        entry.name = self.current = _decode(value)
                    elif key == "linkpath":
                        entry.linkname = _decode(value)
                    elif key == "size":
                        size = int(value)
                    elif key == "uid":
                        entry.uid = int(value)
                    elif key == "gid":
                        entry.gid = int(value)
                    elif key == "mtime":
                        mtime = _pax_time(value)
                    elif key == "atime":
                        atime = _pax_time(value)
                    elif key.startswith("GNU.sparse."):
                        raise InvalidArgument(
                            f"layer tar: entry {entry.name!r}: unsupported entry (PAX sparse file)"
                        )
            except ValueError:
                raise InvalidArgument(f"layer tar: entry {entry.name!r}: malformed PAX value") from None
        if size < 0:
            raise InvalidArgument(f"layer tar: entry {entry.name!r}: negative size")
        # Like containerd: times outside [epoch, 2262] become the epoch; atime is at least mtime.
        if mtime < 0 or mtime >= 1 << 63:
            mtime = 0
        entry.mtime_ns = mtime
        entry.atime_ns = atime if mtime < atime < 1 << 63 else mtime
        if kind in _HEADER_ONLY:
            size = 0  # header-only types carry no data whatever the size field says
        entry.size = size
        self._remaining = size
        self._padding = -size % BLOCK
        return entry


# -- writer --------------------------------------------------------------------------------------


def _octal(value: int, width: int) -> bytes | None:
    """`value` as a NUL-terminated octal field of `width` bytes, None when it does not fit."""
    if value < 0:
        return None
    text = b"%0*o" % (width - 1, value)
    if len(text) > width - 1:
        return None
    return text + b"\0"


def pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode("utf-8", "surrogateescape") + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def _pad(n: int) -> bytes:
    return bytes(-n % BLOCK)


def _raw_header(
    name: bytes,
    kind: str,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    linkname: bytes,
    devmajor: int,
    devminor: int,
) -> bytearray:
    block = bytearray(BLOCK)
    block[0 : len(name)] = name
    block[100:108] = _octal(mode, 8) or b"0000000\0"
    block[108:116] = _octal(uid, 8) or b"0000000\0"
    block[116:124] = _octal(gid, 8) or b"0000000\0"
    block[124:136] = _octal(size, 12) or b"00000000000\0"
    block[136:148] = _octal(mtime, 12) or b"00000000000\0"
    block[156:157] = kind.encode()
    block[157 : 157 + len(linkname)] = linkname
    block[257:265] = USTAR_MAGIC
    block[329:337] = _octal(devmajor, 8) or b"0000000\0"
    block[337:345] = _octal(devminor, 8) or b"0000000\0"
    block[148:156] = b"        "
    block[148:156] = b"%06o\0 " % sum(block)
    return block


def header(
    name: str,
    kind: str,
    *,
    mode: int = 0,
    uid: int = 0,
    gid: int = 0,
    size: int = 0,
    mtime: int = 0,
    linkname: str = "",
    devmajor: int = 0,
    devminor: int = 0,
    xattrs: Iterable[tuple[str, bytes]] = (),
) -> bytes:
    """The header block(s) of one entry: a PAX header first when a field does not fit ustar.

    Output is a pure function of the arguments (no user/group names, no atime/ctime), so the same
    tree always gives the same bytes. `mtime` is in whole seconds.
    """
    records: list[tuple[str, bytes]] = []
    raw_name = name.encode("utf-8", "surrogateescape")
    raw_link = linkname.encode("utf-8", "surrogateescape")
    if len(raw_name) > 100 or not raw_name.isascii():
        records.append(("path", raw_name))
        raw_name = raw_name[:100]
    if len(raw_link) > 100 or not raw_link.isascii():
        records.append(("linkpath", raw_link))
        raw_link = raw_link[:100]
    for key, value in (("uid", uid), ("gid", gid)):
        if _octal(value, 8) is None:
            records.append((key, str(value).encode()))
    if _octal(size, 12) is None:
        records.append(("size", str(size).encode()))
    if _octal(mtime, 12) is None:
        records.append(("mtime", str(mtime).encode()))
    for key, value in xattrs:
        records.append((XATTR_PREFIX + key, value))
    main = _raw_header(raw_name, kind, mode, uid, gid, size, mtime, raw_link, devmajor, devminor)
    if not records:
        return bytes(main)
    records.sort()
    payload = b"".join(pax_record(k, v) for k, v in records)
    base = name.rstrip("/").rpartition("/")
    pax_name = (base[0] + "/" if base[0] else "") + "PaxHeaders.0/" + base[2]
    raw_pax_name = pax_name.encode("utf-8", "surrogateescape")[:100]
    pax = _raw_header(raw_pax_name, "x", 0o644, 0, 0, len(payload), 0, b"", 0, 0)
    return bytes(pax) + payload + _pad(len(payload)) + bytes(main)


def data_padding(size: int) -> bytes:
    return _pad(size)


END_OF_ARCHIVE = bytes(2 * BLOCK)
