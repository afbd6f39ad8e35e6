"""runtimed.diff.write_diff: layers written from two real trees, read back and applied again.

The main property: apply(write_diff(a, b)) onto a copy of a reproduces b (types, modes, owners,
mtimes to the second, content, link targets, xattrs, hardlink groups). Needs root (ownership,
security.capability, overlay mounts); skipped otherwise.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtimed.diff import apply_layer, write_diff
from runtimed.diff.mediatypes import LAYER_TAR, LAYER_TAR_GZIP
from runtimed.errors import InvalidArgument
from runtimed.types import Mount

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: ownership, capabilities and overlay mounts"),
]

T0 = 1_500_000_000
CAPABILITY = b"\x01\x00\x00\x02" + b"\x00\x04\x00\x00" + bytes(12)  # cap_net_bind_service, v2


def bind(path: Path) -> list[Mount]:
    return [Mount(type="bind", source=str(path), options=["rw", "rbind"])]


def overlay(upper: Path, work: Path, *lowers: Path) -> list[Mount]:
    options = ["index=off", f"workdir={work}", f"upperdir={upper}", "lowerdir=" + ":".join(map(str, lowers))]
    return [Mount(type="overlay", source="overlay", options=options)]


def touch(path: Path, seconds: int) -> None:
    os.utime(path, ns=(seconds * 10**9, seconds * 10**9), follow_symlinks=False)


def write(path: Path, data: bytes | str, mode: int = 0o644, uid: int = 0, gid: int = 0, t: int = T0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    touch(path, t)


def copy_tree(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-a", "--", str(src), str(dst)], check=True)


def snapshot(root: Path) -> dict:
    """Everything the round trip must preserve; mtimes to the second (layers carry whole seconds)."""
    entries = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(kind):
                detail: object = path.read_bytes()
            elif stat.S_ISLNK(kind):
                detail = os.readlink(path)
            elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                detail = st.st_rdev
            else:
                detail = None
            xattrs = sorted(
                (k, os.getxattr(path, k, follow_symlinks=False))
                for k in os.listxattr(path, follow_symlinks=False)
                if k.startswith(("user.", "security.capability"))
            )
            mode = None if stat.S_ISLNK(kind) else stat.S_IMODE(st.st_mode)
            entries[rel] = (kind, mode, st.st_uid, st.st_gid, st.st_mtime_ns // 10**9, detail, xattrs)
            if not stat.S_ISDIR(kind) and st.st_nlink > 1:
                inodes.setdefault(st.st_ino, []).append(rel)
    groups = sorted(sorted(paths) for paths in inodes.values() if len(paths) > 1)
    return {"entries": entries, "hardlinks": groups}


def make_base(a: Path) -> None:
    a.mkdir()
    write(a / "etc/passwd", "root:x:0:0\n")
    write(a / "etc/shadow", "root:*:1::::::\n", mode=0o640, gid=42)
    write(a / "etc/same-size", "AAAA")
    write(a / "usr/bin/tool", os.urandom(50_000), mode=0o4755)
    os.setxattr(a / "usr/bin/tool", "security.capability", CAPABILITY)
    write(a / "usr/bin/hl1", "shared")
    os.link(a / "usr/bin/hl1", a / "usr/bin/hl2")
    os.symlink("tool", a / "usr/bin/sh")
    os.symlink("/nonexistent/target", a / "dangling")
    os.mkfifo(a / "fifo", 0o600)
    write(a / "xattr-file", "x")
    os.setxattr(a / "xattr-file", "user.drop", b"me")
    write(a / "to-delete", "bye")
    write(a / "dir-to-delete/sub/f", "f")
    write(a / "replace-me", "file")
    write(a / "dir-to-file/child", "c")
    write(a / "file-to-link", "f")
    write(a / "big", os.urandom(3 << 20))
    (a / "var/empty").mkdir(parents=True, mode=0o700)
    os.chown(a / "var/empty", 33, 33)
    (a / "opt/keep").mkdir(parents=True)
    for path in sorted(a.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_dir() and not path.is_symlink():
            touch(path, T0 + 1)


def change(b: Path) -> None:
    write(b / "etc/passwd", "root:x:0:0\nuser:x:1000:1000\n", t=T0 + 50)
    # Same size, same whole-second mtime: only the content differs.
    write(b / "etc/same-size", "BBBB")
    os.chmod(b / "etc/shadow", 0o600)
    os.chown(b / "var/empty", 34, 34)
    (b / "to-delete").unlink()
    shutil.rmtree(b / "dir-to-delete")
    (b / "replace-me").unlink()
    write(b / "replace-me/inside", "now a dir", mode=0o600, uid=1000, gid=1000)
    shutil.rmtree(b / "dir-to-file")
    write(b / "dir-to-file", "now a file")
    (b / "file-to-link").unlink()
    os.symlink("etc/passwd", b / "file-to-link")
    write(b / "new/deeper/file", "new", mode=0o751, uid=12, gid=13, t=T0 + 99)
    os.link(b / "new/deeper/file", b / "new/hardlink")
    os.link(b / "usr/bin/hl1", b / "usr/bin/hl3")  # a new link to an unchanged inode
    os.removexattr(b / "xattr-file", "user.drop")
    os.setxattr(b / "etc/passwd", "user.added", b"1")
    os.unlink(b / "usr/bin/sh")
    os.symlink("busybox", b / "usr/bin/sh")
    touch(b / "opt/keep", T0 + 1000)
    write(b / "name with spaces and ünïcode", "u")
    write(b / ("long/" + "d" * 150 + "/" + "f" * 120), "long")


def tar_names(blob: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
        return [member.name for member in tar.getmembers()]


def diff_bytes(lower: list[Mount], upper: list[Mount], compression: str = "gzip"):
    out = io.BytesIO()
    written = write_diff(lower, upper, out, compression=compression)
    return written, out.getvalue()


@contextlib.contextmanager
def mounted_overlay(tmp: Path, upper: Path, work: Path, *lowers: Path) -> Iterator[Path]:
    merged = tmp / "merged"
    merged.mkdir(exist_ok=True)
    options = f"index=off,workdir={work},upperdir={upper},lowerdir=" + ":".join(map(str, lowers))
    result = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"overlay cannot be mounted here: {result.stderr.strip()}")
    try:
        yield merged
    finally:
        subprocess.run(["umount", str(merged)], check=True)


# -- tests -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_round_trip_bind(tmp_path, compression):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_base(a)
    copy_tree(a, b)
    change(b)
    copy_tree(a, c)

    written, blob = diff_bytes(bind(a), bind(b), compression)
    assert written.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert written.size == len(blob)
    tar = gzip.decompress(blob) if compression == "gzip" else blob
    assert written.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert written.uncompressed_size == len(tar)
    assert written.media_type == (LAYER_TAR_GZIP if compression == "gzip" else LAYER_TAR)

    names = tar_names(blob)
    assert ".wh.to-delete" in names and ".wh.dir-to-delete" in names
    assert not any(n.startswith("dir-to-delete/") for n in names)
    assert "big" not in names and "usr/bin/tool" not in names  # unchanged files are not carried
    assert names.index("usr") < names.index("usr/bin") < names.index("usr/bin/hl3")

    media_type = LAYER_TAR_GZIP if compression == "gzip" else LAYER_TAR
    applied = apply_layer(io.BytesIO(blob), media_type, bind(c))
    assert applied.digest == written.diff_id
    assert snapshot(c) == snapshot(b)
    assert ["usr/bin/hl1", "usr/bin/hl2", "usr/bin/hl3"] in snapshot(c)["hardlinks"]


def test_output_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_base(a)
    copy_tree(a, b)
    change(b)
    first, blob1 = diff_bytes(bind(a), bind(b))
    second, blob2 = diff_bytes(bind(a), bind(b))
    assert blob1 == blob2 and first == second
    # The same tar whatever the compression.
    plain, _ = diff_bytes(bind(a), bind(b), "none")
    assert plain.diff_id == first.diff_id


def test_unchanged_tree_gives_an_empty_layer(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_base(a)
    copy_tree(a, b)
    written, blob = diff_bytes(bind(a), bind(b), "none")
    assert blob == bytes(1024)
    assert written.diff_id == "sha256:" + hashlib.sha256(bytes(1024)).hexdigest()


def test_no_parent_adds_everything(tmp_path):
    a, c = tmp_path / "a", tmp_path / "c"
    make_base(a)
    c.mkdir()
    _, blob = diff_bytes([], bind(a))
    assert not any(".wh." in name for name in tar_names(blob))
    apply_layer(io.BytesIO(blob), LAYER_TAR_GZIP, bind(c))
    assert snapshot(c) == snapshot(a)


def test_overlay_upper_fast_path_round_trip(tmp_path):
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    make_base(lower)
    upper.mkdir()
    work.mkdir()
    with mounted_overlay(tmp_path, upper, work, lower) as merged:
        change(merged)
        # rm -rf + mkdir on overlay makes an opaque directory in the upper layer
        shutil.rmtree(merged / "opt")
        write(merged / "opt/fresh", "fresh")
        expected = snapshot(merged)
    assert os.getxattr(upper / "opt", "trusted.overlay.opaque") == b"y"

    written, blob = diff_bytes(bind(lower), overlay(upper, work, lower))
    names = tar_names(blob)
    assert "opt/.wh..wh..opq" in names
    assert ".wh.to-delete" in names and ".wh.dir-to-delete" in names
    assert "big" not in names

    # Onto a copy of the lower layer (bind: real deletions) ...
    c = tmp_path / "c"
    copy_tree(lower, c)
    applied = apply_layer(io.BytesIO(blob), LAYER_TAR_GZIP, bind(c))
    assert applied.digest == written.diff_id
    assert snapshot(c) == expected

    # ... and as a new overlay layer (overlay whiteouts), seen through a mount.
    upper2, work2 = tmp_path / "upper2", tmp_path / "work2"
    upper2.mkdir()
    work2.mkdir()
    apply_layer(io.BytesIO(blob), LAYER_TAR_GZIP, overlay(upper2, work2, lower))
    with mounted_overlay(tmp_path, upper2, work2, lower) as merged2:
        assert snapshot(merged2) == expected


def test_mismatched_overlay_is_mounted_read_only_and_compared(tmp_path):
    lower, upper, work, empty = tmp_path / "lower", tmp_path / "upper", tmp_path / "work", tmp_path / "empty"
    make_base(lower)
    for d in (upper, work, empty):
        d.mkdir()
    write(upper / "added", "added")
    before = Path("/proc/self/mountinfo").read_text()
    _, blob = diff_bytes(bind(empty), overlay(upper, work, lower))
    assert Path("/proc/self/mountinfo").read_text() == before
    names = tar_names(blob)
    assert "added" in names and "etc/passwd" in names and "big" in names
    assert not any(".wh." in name for name in names)


def test_unsupported_compression(tmp_path):
    with pytest.raises(InvalidArgument):
        write_diff([], bind(tmp_path), io.BytesIO(), compression="lz4")
    with pytest.raises(InvalidArgument):
        write_diff([], bind(tmp_path), io.BytesIO(), compression="zstd")


def test_devices_and_sockets(tmp_path):
    import socket

    a, c = tmp_path / "a", tmp_path / "c"
    a.mkdir()
    c.mkdir()
    os.mknod(a / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkfifo(a / "fifo", 0o640)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(a / "sock"))
    _, blob = diff_bytes([], bind(a), "none")
    assert tar_names(blob) == ["fifo", "null"]  # sockets are not carried
    with pytest.raises(InvalidArgument, match="character device 1:3"):
        apply_layer(io.BytesIO(blob), LAYER_TAR, bind(c))
    shutil.rmtree(c)
    c.mkdir()
    apply_layer(io.BytesIO(blob), LAYER_TAR, bind(c), devices="create")
    os.unlink(a / "sock")
    assert snapshot(c) == snapshot(a)
