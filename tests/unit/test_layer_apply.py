"""runtimed.diff.apply_layer: real layers (built here with tarfile, gzip, zstd) applied to real dirs.

Needs root (ownership, trusted.* xattrs, whiteout devices, overlay mounts); skipped otherwise.
Attack layers are checked against a sentinel directory beside the target: it must be untouched.
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

from runtimed.diff import DevicePolicy, apply_layer
from runtimed.diff.mediatypes import (
    DOCKER_LAYER_GZIP,
    LAYER_ND_TAR_GZIP,
    LAYER_TAR,
    LAYER_TAR_GZIP,
    LAYER_TAR_ZSTD,
)
from runtimed.errors import FailedPrecondition, InvalidArgument
from runtimed.types import Mount

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: ownership, devices and trusted xattrs"),
]

MTIME = 1_600_000_000


# -- building layers ---------------------------------------------------------------------------------
def pax_xattrs(xattrs: dict[str, str | bytes]) -> dict[str, str]:
    # tarfile wants str values; binary ones go through surrogateescape (it then writes hdrcharset=BINARY).
    return {
        f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v
        for k, v in xattrs.items()
    }


class Layer:
    """A tar built entry by entry with tarfile (an independent writer), PAX format by default."""

    def __init__(self, fmt: int = tarfile.PAX_FORMAT) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=fmt)  # noqa: SIM115 - closed by bytes()
        self.meta: dict[str, tuple[int, int, int, int]] = {}  # name -> (mode, uid, gid, mtime)

    def _info(self, name: str, type_: bytes, mode: int, uid: int, gid: int, mtime: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = type_
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.mtime = mtime
        self.meta[name] = (mode, uid, gid, mtime)
        return info

    def file(self, name, data=b"", mode=0o644, uid=0, gid=0, mtime=MTIME, xattrs=None) -> Layer:
        info = self._info(name, tarfile.REGTYPE, mode, uid, gid, mtime)
        info.size = len(data)
        if xattrs:
            info.pax_headers = pax_xattrs(xattrs)
        self.tar.addfile(info, io.BytesIO(data))
        return self

    def dir(self, name, mode=0o755, uid=0, gid=0, mtime=MTIME, xattrs=None) -> Layer:
        info = self._info(name, tarfile.DIRTYPE, mode, uid, gid, mtime)
        if xattrs:
            info.pax_headers = pax_xattrs(xattrs)
        self.tar.addfile(info)
        return self

    def symlink(self, name, target, uid=0, gid=0, mtime=MTIME) -> Layer:
        info = self._info(name, tarfile.SYMTYPE, 0o777, uid, gid, mtime)
        info.linkname = target
        self.tar.addfile(info)
        return self

    def hardlink(self, name, target, mode=None, uid=None, gid=None, mtime=None) -> Layer:
        # Real tar writers repeat the inode's metadata in a link entry; apply sets it on the inode.
        known = self.meta.get(target, (0o644, 0, 0, MTIME))
        values = [v if v is not None else k for v, k in zip((mode, uid, gid, mtime), known, strict=True)]
        info = self._info(name, tarfile.LNKTYPE, *values)
        info.linkname = target
        self.tar.addfile(info)
        return self

    def fifo(self, name, mode=0o640) -> Layer:
        self.tar.addfile(self._info(name, tarfile.FIFOTYPE, mode, 0, 0, MTIME))
        return self

    def device(self, name, major, minor, block=False) -> Layer:
        info = self._info(name, tarfile.BLKTYPE if block else tarfile.CHRTYPE, 0o600, 0, 0, MTIME)
        info.devmajor, info.devminor = major, minor
        self.tar.addfile(info)
        return self

    def whiteout(self, name) -> Layer:
        parent, _, base = name.rpartition("/")
        return self.file(f"{parent}/.wh.{base}" if parent else f".wh.{base}")

    def opaque(self, directory) -> Layer:
        return self.file(f"{directory}/.wh..wh..opq")

    def bytes(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


def zstd_compress(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-c", "-3"], input=data, capture_output=True, check=True).stdout


def bind(path: Path) -> list[Mount]:
    return [Mount(type="bind", source=str(path), options=["rw", "rbind"])]


def overlay(upper: Path, work: Path, *lowers: Path) -> list[Mount]:
    options = ["index=off", f"workdir={work}", f"upperdir={upper}", "lowerdir=" + ":".join(map(str, lowers))]
    return [Mount(type="overlay", source="overlay", options=options)]


def apply_bytes(data: bytes, media_type: str, mounts: list[Mount], **kwargs):
    return apply_layer(io.BytesIO(data), media_type, mounts, **kwargs)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def mounted_overlay(tmp: Path, upper: Path, *lowers: Path) -> Iterator[Path]:
    work = tmp / "ovl-work"
    merged = tmp / "ovl-merged"
    work.mkdir(exist_ok=True)
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


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# -- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture
def target(tmp_path) -> Path:
    path = tmp_path / "target"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path) -> Path:
    """A sentinel directory beside the target, with a file an attack would like to reach."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret").write_text("secret")
    return path


def assert_untouched(outside: Path, tmp_path: Path) -> None:
    assert listing(outside) == {"secret"}
    assert (outside / "secret").read_text() == "secret"
    assert os.stat(outside / "secret").st_nlink == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "target"]


# -- formats and metadata -----------------------------------------------------------------------------
def rich_layer() -> bytes:
    long_name = "deep/" + "n" * 120 + "/file-with-a-long-name-" + "x" * 60
    return (
        Layer()
        .dir("bin/", mode=0o755, mtime=MTIME - 100)
        .file("bin/tool", b"\x7fELF" + os.urandom(70_000), mode=0o4755, uid=1000, gid=1001, mtime=MTIME - 7)
        .file("bin/sgid", b"x", mode=0o2711, uid=5, gid=6)
        .file(
            "bin/capped",
            b"cap",
            mode=0o750,
            xattrs={"security.capability": b"\x01\x00\x00\x02" + bytes(16), "user.note": "hi"},
        )
        .dir("tmp/", mode=0o1777)
        .symlink("bin/sh", "/bin/busybox", uid=7, gid=8, mtime=MTIME - 3)
        .hardlink("bin/tool-link", "bin/tool")
        .fifo("run/fifo", mode=0o620)
        .file(long_name, b"long")
        .file("unicodé/ñame", b"utf8")
        .file("empty", b"")
        .dir("dir-with-xattr/", mode=0o700, xattrs={"user.k": "v"})
        .bytes()
    )


@pytest.mark.parametrize(
    ("media_type", "compress"),
    [
        (LAYER_TAR, lambda b: b),
        (LAYER_TAR_GZIP, gzip.compress),
        (DOCKER_LAYER_GZIP, gzip.compress),
        (LAYER_ND_TAR_GZIP, gzip.compress),
        (LAYER_TAR_ZSTD, zstd_compress),
    ],
    ids=["tar", "gzip", "docker-gzip", "nondistributable-gzip", "zstd"],
)
@pytest.mark.parametrize("source", ["stream", "path"])
def test_apply_formats_and_metadata(media_type, compress, source, target, tmp_path):
    raw = rich_layer()
    blob = compress(raw)
    if source == "path":
        path = tmp_path / "blob"
        path.write_bytes(blob)
        applied = apply_layer(path, media_type, bind(target))
        path.unlink()
    else:
        applied = apply_bytes(blob, media_type, bind(target))

    assert applied.digest == sha256(raw)
    assert applied.size == len(raw)
    assert applied.descriptor().media_type == LAYER_TAR

    tool = os.lstat(target / "bin/tool")
    assert stat.S_IMODE(tool.st_mode) == 0o4755
    assert (tool.st_uid, tool.st_gid) == (1000, 1001)
    assert tool.st_mtime_ns == (MTIME - 7) * 10**9
    assert tool.st_nlink == 2
    assert os.lstat(target / "bin/tool-link").st_ino == tool.st_ino
    assert stat.S_IMODE(os.lstat(target / "bin/sgid").st_mode) == 0o2711
    assert os.getxattr(target / "bin/capped", "security.capability")[:4] == b"\x01\x00\x00\x02"
    assert os.getxattr(target / "bin/capped", "user.note") == b"hi"
    assert stat.S_IMODE(os.lstat(target / "tmp").st_mode) == 0o1777
    link = os.lstat(target / "bin/sh")
    assert stat.S_ISLNK(link.st_mode) and os.readlink(target / "bin/sh") == "/bin/busybox"
    assert (link.st_uid, link.st_gid) == (7, 8)
    assert link.st_mtime_ns == (MTIME - 3) * 10**9
    fifo = os.lstat(target / "run/fifo")
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o620
    # A parent the layer did not list: created 0755.
    assert stat.S_IMODE(os.lstat(target / "run").st_mode) == 0o755
    long_file = next((target / "deep").rglob("file-with-a-long-name-*"))
    assert long_file.read_bytes() == b"long"
    assert (target / "unicodé/ñame").read_bytes() == b"utf8"
    assert (target / "empty").read_bytes() == b""
    assert os.getxattr(target / "dir-with-xattr", "user.k") == b"v"
    # Directory times are set after their contents were created.
    assert os.lstat(target / "bin").st_mtime_ns == (MTIME - 100) * 10**9
    assert os.lstat(target / "dir-with-xattr").st_mtime_ns == MTIME * 10**9


@pytest.mark.parametrize("threaded", [True, False])
def test_threaded_and_inline_agree(threaded, target):
    raw = rich_layer()
    applied = apply_bytes(gzip.compress(raw), LAYER_TAR_GZIP, bind(target), threaded=threaded)
    assert applied.digest == sha256(raw)


def test_gnu_format_long_names_and_big_ids(target):
    name = "g/" + "long" * 40
    raw = Layer(tarfile.GNU_FORMAT).file(name, b"gnu", uid=3_000_000, gid=2_500_000).bytes()
    applied = apply_bytes(raw, LAYER_TAR, bind(target))
    assert applied.digest == sha256(raw)
    st = os.lstat(target / name)
    assert (st.st_uid, st.st_gid) == (3_000_000, 2_500_000)


def test_diff_id_covers_trailing_bytes(target):
    raw = Layer().file("a", b"a").bytes() + bytes(4096)
    applied = apply_bytes(gzip.compress(raw), LAYER_TAR_GZIP, bind(target))
    assert applied.digest == sha256(raw)
    assert applied.size == len(raw)


def test_multi_member_gzip(target):
    raw = Layer().file("a", b"a" * 5000).file("b", b"b").bytes()
    blob = gzip.compress(raw[:2048]) + gzip.compress(raw[2048:])
    applied = apply_bytes(blob, LAYER_TAR_GZIP, bind(target))
    assert applied.digest == sha256(raw)
    assert (target / "b").read_bytes() == b"b"


def test_unknown_media_type_is_invalid_argument(target):
    with pytest.raises(InvalidArgument, match=r"application/vnd\.oci\.image\.config\.v1\+json"):
        apply_bytes(b"", "application/vnd.oci.image.config.v1+json", bind(target))


def test_replacing_entries(target):
    (target / "was-file").write_text("f")
    (target / "was-dir").mkdir()
    (target / "was-dir/child").write_text("c")
    (target / "merge").mkdir(mode=0o700)
    (target / "merge/old").write_text("old")
    (target / "over").write_text("old content")
    raw = (
        Layer()
        .dir("was-file/", mode=0o750)
        .file("was-dir", b"now a file")
        .dir("merge/", mode=0o711, uid=4, gid=4)
        .file("merge/new", b"new")
        .file("over", b"new content", mode=0o600)
        .bytes()
    )
    apply_bytes(raw, LAYER_TAR, bind(target))
    assert stat.S_ISDIR(os.lstat(target / "was-file").st_mode)
    assert (target / "was-dir").read_bytes() == b"now a file"
    merge = os.lstat(target / "merge")
    assert stat.S_IMODE(merge.st_mode) == 0o711 and merge.st_uid == 4
    assert sorted(os.listdir(target / "merge")) == ["new", "old"]
    assert (target / "over").read_bytes() == b"new content"


def test_root_entry_and_dot_slash_names(target):
    raw = Layer().dir("./", mode=0o700).dir("./etc/").file("./etc/hosts", b"h").file("a//b/./c", b"c").bytes()
    apply_bytes(raw, LAYER_TAR, bind(target))
    assert (target / "etc/hosts").read_bytes() == b"h"
    assert (target / "a/b/c").read_bytes() == b"c"
    # The root entry is ignored, like containerd: the snapshot root keeps its mode.
    assert stat.S_IMODE(os.lstat(target).st_mode) == 0o755


# -- whiteouts ---------------------------------------------------------------------------------------
def make_lower(root: Path) -> None:
    (root / "keep").write_text("keep")
    (root / "gone").write_text("gone")
    (root / "gonedir/sub").mkdir(parents=True)
    (root / "gonedir/sub/f").write_text("f")
    (root / "opq/sub").mkdir(parents=True)
    (root / "opq/old").write_text("old")
    (root / "opq/sub/old2").write_text("old2")
    (root / "lowerdir").mkdir(mode=0o710)
    os.chmod(root / "lowerdir", 0o710)
    os.chown(root / "lowerdir", 11, 12)
    (root / "lowerdir/file").write_text("lf")
    (root / "hl-target").write_text("to be linked")


def whiteout_layer(opaque_first: bool = True) -> bytes:
    layer = Layer().whiteout("gone").whiteout("gonedir").dir("opq/")
    if opaque_first:
        layer.opaque("opq").file("opq/new", b"new")
    else:
        layer.file("opq/new", b"new").opaque("opq")
    return layer.dir("opq/sub/").file("opq/sub/new2", b"n2").bytes()


@pytest.mark.parametrize("opaque_first", [True, False])
def test_whiteouts_bind(target, opaque_first):
    make_lower(target)
    apply_bytes(whiteout_layer(opaque_first), LAYER_TAR, bind(target))
    assert listing(target) == {
        "keep",
        "opq",
        "opq/new",
        "opq/sub",
        "opq/sub/new2",
        "lowerdir",
        "lowerdir/file",
        "hl-target",
    }


def test_whiteouts_overlay_form_and_merged_view(tmp_path):
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for d in (lower, upper, work):
        d.mkdir()
    make_lower(lower)
    raw = (
        Layer()
        .whiteout("gone")
        .whiteout("gonedir")
        .dir("opq/")
        .opaque("opq")
        .file("opq/new", b"new")
        .file("lowerdir/added", b"a")  # no entry for lowerdir/: copied up from the lower layer
        .hardlink("linked", "hl-target")  # target only in the lower layer: copied up, then linked
        .bytes()
    )
    applied = apply_bytes(raw, LAYER_TAR, overlay(upper, work, lower))
    assert applied.digest == sha256(raw)

    gone = os.lstat(upper / "gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert stat.S_ISCHR(os.lstat(upper / "gonedir").st_mode)
    assert os.getxattr(upper / "opq", "trusted.overlay.opaque") == b"y"
    assert not (upper / "opq/.wh..wh..opq").exists()
    copied = os.lstat(upper / "lowerdir")
    assert stat.S_IMODE(copied.st_mode) == 0o710 and (copied.st_uid, copied.st_gid) == (11, 12)
    assert os.lstat(upper / "linked").st_ino == os.lstat(upper / "hl-target").st_ino
    assert listing(work) == set()

    with mounted_overlay(tmp_path, upper, lower) as merged:
        assert listing(merged) == {
            "keep",
            "opq",
            "opq/new",
            "lowerdir",
            "lowerdir/file",
            "lowerdir/added",
            "hl-target",
            "linked",
        }
        assert (merged / "keep").read_text() == "keep"


def test_overlay_dir_replacing_a_whiteout_is_opaque(tmp_path):
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "d").mkdir()
    (lower / "d/old").write_text("old")
    raw = Layer().whiteout("d").dir("d/").file("d/new", b"new").bytes()
    apply_bytes(raw, LAYER_TAR, overlay(upper, work, lower))
    with mounted_overlay(tmp_path, upper, lower) as merged:
        assert listing(merged) == {"d", "d/new"}


def test_trusted_xattrs_from_a_layer_are_dropped(tmp_path):
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for d in (lower, upper, work):
        d.mkdir()
    raw = Layer().dir("d/", xattrs={"trusted.overlay.redirect": "/etc", "user.ok": "1"}).bytes()
    apply_bytes(raw, LAYER_TAR, overlay(upper, work, lower))
    assert "trusted.overlay.redirect" not in os.listxattr(upper / "d")
    assert os.getxattr(upper / "d", "user.ok") == b"1"


# -- attacks -------------------------------------------------------------------------------------------
def attacks(outside: Path) -> dict[str, bytes]:
    return {
        "dotdot": Layer().file("../outside/escape", b"x").bytes(),
        "dotdot-inner": Layer().dir("a/").file("a/../../outside/escape", b"x").bytes(),
        "absolute": Layer().file(str(outside / "abs"), b"x").bytes(),
        "symlink-parent": Layer().symlink("link", str(outside)).file("link/file", b"x").bytes(),
        "symlink-relative-parent": Layer().symlink("link", "../outside").file("link/file", b"x").bytes(),
        "symlink-dotdot-chain": Layer()
        .dir("a/")
        .symlink("a/up", "..")
        .symlink("a/upup", "up/..")
        .file("a/upup/up/escape", b"x")
        .bytes(),
        "symlink-dir-swap": Layer()
        .dir("d/")
        .file("d/f", b"f")
        .symlink("d", str(outside))
        .file("d/escape", b"x")
        .bytes(),
        "hardlink-absolute": Layer().hardlink("passwd", "/etc/passwd").bytes(),
        "hardlink-dotdot": Layer().hardlink("stolen", "../outside/secret").bytes(),
        "hardlink-through-symlink": Layer()
        .symlink("link", str(outside))
        .hardlink("stolen", "link/secret")
        .bytes(),
        "hardlink-to-dir": Layer().dir("d/").hardlink("dl", "d").bytes(),
        "whiteout-through-symlink": Layer().symlink("link", str(outside)).whiteout("link/secret").bytes(),
        "opaque-through-symlink": Layer().symlink("link", str(outside)).opaque("link").bytes(),
        "whiteout-dotdot": Layer().file(".wh..", b"").bytes(),
        "char-device": Layer().device("dev/mem", 1, 1).bytes(),
        "block-device": Layer().device("dev/sda", 8, 0, block=True).bytes(),
    }


ATTACKS = sorted(attacks(Path("/x")))


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("compressed", [False, True])
def test_attack_layers_are_refused(attack, compressed, target, outside, tmp_path):
    raw = attacks(outside)[attack]
    passwd = os.stat("/etc/passwd")
    media_type, blob = (LAYER_TAR_GZIP, gzip.compress(raw)) if compressed else (LAYER_TAR, raw)
    with pytest.raises(InvalidArgument) as info:
        apply_bytes(blob, media_type, bind(target))
    assert "layer entry" in str(info.value)
    assert_untouched(outside, tmp_path)
    assert os.stat("/etc/passwd").st_nlink == passwd.st_nlink
    assert not Path("/abs").exists()


@pytest.mark.parametrize("attack", ["symlink-parent", "hardlink-through-symlink", "whiteout-through-symlink"])
def test_attack_layers_are_refused_in_overlay_mode(attack, outside, tmp_path):
    lower, upper, work = tmp_path / "target", tmp_path / "upper", tmp_path / "work"
    lower.mkdir()
    upper.mkdir()
    work.mkdir()
    with pytest.raises(InvalidArgument):
        apply_bytes(attacks(outside)[attack], LAYER_TAR, overlay(upper, work, lower))
    assert listing(outside) == {"secret"}


def test_symlink_planted_by_a_lower_layer_is_not_followed(target, outside, tmp_path):
    os.symlink(outside, target / "planted")
    with pytest.raises(InvalidArgument, match="symlink"):
        apply_bytes(Layer().file("planted/file", b"x").bytes(), LAYER_TAR, bind(target))
    assert_untouched(outside, tmp_path)


def test_symlink_in_a_lower_layer_is_not_followed_in_overlay_mode(outside, tmp_path):
    lower, upper, work = tmp_path / "target", tmp_path / "upper", tmp_path / "work"
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "var").mkdir()
    os.symlink(outside, lower / "var/run")
    for raw in (Layer().file("var/run/pid", b"1").bytes(), Layer().whiteout("var/run/secret").bytes()):
        with pytest.raises(InvalidArgument, match="symlink in a lower layer"):
            apply_bytes(raw, LAYER_TAR, overlay(upper, work, lower))
        assert listing(outside) == {"secret"}
    # Replacing the symlink itself is fine.
    apply_bytes(
        Layer().dir("var/run/").file("var/run/pid", b"1").bytes(), LAYER_TAR, overlay(upper, work, lower)
    )
    assert (upper / "var/run/pid").read_bytes() == b"1"
    assert listing(outside) == {"secret"}


def test_symlink_final_component_is_replaced_not_followed(target, outside, tmp_path):
    os.symlink(outside / "secret", target / "f")
    apply_bytes(Layer().file("f", b"mine").bytes(), LAYER_TAR, bind(target))
    assert (target / "f").read_bytes() == b"mine"
    assert not (target / "f").is_symlink()
    assert_untouched(outside, tmp_path)


def test_devices_policy(target):
    raw = Layer().device("dev/null", 1, 3).device("wh", 0, 0).fifo("dev/fifo").bytes()
    with pytest.raises(InvalidArgument, match=r"'dev/null'.*character device 1:3"):
        apply_bytes(raw, LAYER_TAR, bind(target))
    shutil.rmtree(target)
    target.mkdir()
    apply_bytes(raw, LAYER_TAR, bind(target), devices=DevicePolicy.SKIP)
    assert not (target / "dev/null").exists()
    assert stat.S_ISCHR(os.lstat(target / "wh").st_mode)  # 0/0 is inert: always allowed
    assert stat.S_ISFIFO(os.lstat(target / "dev/fifo").st_mode)
    shutil.rmtree(target)
    target.mkdir()
    apply_bytes(raw, LAYER_TAR, bind(target), devices="create")
    assert os.lstat(target / "dev/null").st_rdev == os.makedev(1, 3)


# -- corrupt input ---------------------------------------------------------------------------------------
def big_layer() -> bytes:
    return Layer().file("a", os.urandom(200_000)).file("b", b"b" * 100_000).bytes()


def test_truncated_gzip(target):
    blob = gzip.compress(big_layer())
    with pytest.raises(InvalidArgument, match="truncated"):
        apply_bytes(blob[: len(blob) // 2], LAYER_TAR_GZIP, bind(target))


def test_corrupt_gzip(target):
    blob = bytearray(gzip.compress(big_layer()))
    for i in range(1000, 1100):
        blob[i] ^= 0x55
    with pytest.raises(InvalidArgument, match="corrupt gzip"):
        apply_bytes(bytes(blob), LAYER_TAR_GZIP, bind(target))


def test_not_gzip_at_all(target):
    with pytest.raises(InvalidArgument, match="not a gzip stream"):
        apply_bytes(big_layer(), LAYER_TAR_GZIP, bind(target))


def test_trailing_garbage_after_gzip(target):
    with pytest.raises(InvalidArgument, match="trailing data"):
        apply_bytes(gzip.compress(big_layer()) + b"garbage", LAYER_TAR_GZIP, bind(target))


@pytest.mark.parametrize("source", ["stream", "path"])
def test_corrupt_and_truncated_zstd(target, tmp_path, source):
    blob = zstd_compress(big_layer())
    for bad in (blob[: len(blob) // 2], b"not zstd at all"):
        if source == "path":
            (tmp_path / "blob").write_bytes(bad)
            arg: object = tmp_path / "blob"
        else:
            arg = io.BytesIO(bad)
        with pytest.raises(InvalidArgument, match="zstd"):
            apply_layer(arg, LAYER_TAR_ZSTD, bind(target))


def test_truncated_tar_names_the_entry(target):
    raw = big_layer()
    with pytest.raises(InvalidArgument, match="truncated") as info:
        apply_bytes(raw[:100_000], LAYER_TAR, bind(target))
    assert "'a'" in str(info.value)


def test_corrupt_tar_header(target):
    raw = bytearray(Layer().file("a", b"a").file("b", b"b").bytes())
    raw[1024 + 140] ^= 0x01  # inside the second header's mtime field (after the PAX header pair)
    with pytest.raises(InvalidArgument, match="checksum"):
        apply_bytes(bytes(raw), LAYER_TAR, bind(target))


def test_missing_blob_file(target, tmp_path):
    with pytest.raises(FailedPrecondition):
        apply_layer(tmp_path / "nope", LAYER_TAR, bind(target))


# -- mounts ----------------------------------------------------------------------------------------------
def test_readonly_targets_are_refused(target, tmp_path):
    raw = Layer().file("a", b"a").bytes()
    with pytest.raises(FailedPrecondition, match="read-only"):
        apply_bytes(raw, LAYER_TAR, [Mount("bind", str(target), options=["ro", "rbind"])])
    with pytest.raises(FailedPrecondition, match="read-only"):
        apply_bytes(raw, LAYER_TAR, [Mount("overlay", "overlay", options=[f"lowerdir={target}"])])
    with pytest.raises(InvalidArgument):
        apply_bytes(raw, LAYER_TAR, [])


def test_other_mounts_use_a_temporary_mount_and_unmount_it(target):
    raw = Layer().file("a", b"a").whiteout("nothing").bytes()
    before = Path("/proc/self/mountinfo").read_text()
    applied = apply_bytes(raw, LAYER_TAR, [Mount("tmpfs", "tmpfs", options=["size=1m"])])
    assert applied.digest == sha256(raw)
    assert Path("/proc/self/mountinfo").read_text() == before
    with pytest.raises(FailedPrecondition, match="mount"):
        apply_bytes(raw, LAYER_TAR, [Mount("no-such-fs-type", "none")])
    assert Path("/proc/self/mountinfo").read_text() == before


# -- other writers and the plugin ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["pax", "gnu"])
def test_layer_written_by_gnu_tar(fmt, tmp_path, target):
    src = tmp_path / "src"
    (src / "d/e").mkdir(parents=True)
    (src / "d/e/file").write_bytes(os.urandom(3000))
    os.setxattr(src / "d/e/file", "user.from", b"gnu-tar")
    os.chown(src / "d/e/file", 1234, 5678)
    os.chmod(src / "d/e/file", 0o6755)
    os.link(src / "d/e/file", src / "d/link")
    os.symlink("e/file", src / "d/sym")
    long = src / ("x" * 200)
    long.write_text("long")
    argv = ["tar", f"--format={fmt}", "--xattrs", "--xattrs-include=user.*", "--numeric-owner"]
    raw = subprocess.run([*argv, "-C", src, "-c", "."], capture_output=True, check=True).stdout
    applied = apply_bytes(gzip.compress(raw), LAYER_TAR_GZIP, bind(target))
    assert applied.digest == sha256(raw)
    st = os.lstat(target / "d/e/file")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o6755)
    assert st.st_nlink == 2 and os.lstat(target / "d/link").st_ino == st.st_ino
    assert (target / "d/e/file").read_bytes() == (src / "d/e/file").read_bytes()
    assert os.readlink(target / "d/sym") == "e/file"
    assert (target / ("x" * 200)).read_text() == "long"
    if fmt == "pax":
        assert os.getxattr(target / "d/e/file", "user.from") == b"gnu-tar"
    # Directory times survive the creation of their contents (to the second at least).
    assert os.lstat(target / "d").st_mtime_ns // 10**9 == os.lstat(src / "d").st_mtime_ns // 10**9


def test_global_pax_header_is_ignored(target):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "g"}) as tar:
        info = tarfile.TarInfo("f")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
    raw = buf.getvalue()
    applied = apply_bytes(raw, LAYER_TAR, bind(target))
    assert applied.digest == sha256(raw)
    assert listing(target) == {"f"}


async def test_walking_differ_plugin(target):
    from runtimed.diff.plugin import PLUGINS, WalkingDiffer

    assert PLUGINS[0].uri == "io.containerd.differ.v1.walking"
    raw = Layer().file("a", b"a").bytes()
    applied = await WalkingDiffer().apply(io.BytesIO(gzip.compress(raw)), LAYER_TAR_GZIP, bind(target))
    assert applied.descriptor().digest == sha256(raw)
    with pytest.raises(InvalidArgument, match="unsupported layer media type"):
        await WalkingDiffer().apply(io.BytesIO(raw), "text/plain", bind(target))


def test_hardlink_entry_metadata_lands_on_the_shared_inode(tmp_path):
    """containerd applies a link entry's owner, mode and mtime to the inode it links to."""
    import io
    import tarfile

    from runtimed.diff import apply_layer
    from runtimed.types import Mount

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        original = tarfile.TarInfo("bin/tool")
        original.size, original.mode, original.mtime = 4, 0o755, 1_600_000_000
        tar.addfile(original, io.BytesIO(b"tool"))
        link = tarfile.TarInfo("bin/alias")
        link.type, link.linkname = tarfile.LNKTYPE, "bin/tool"
        link.mode, link.mtime, link.uid, link.gid = 0o644, 1_700_000_000, 1234, 5678
        tar.addfile(link)
    target = tmp_path / "fs"
    target.mkdir()
    apply_layer(
        io.BytesIO(buf.getvalue()),
        "application/vnd.oci.image.layer.v1.tar",
        [Mount(type="bind", source=str(target), options=["rw", "rbind"])],
    )
    st = (target / "bin" / "tool").stat()
    assert st.st_ino == (target / "bin" / "alias").stat().st_ino
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid, int(st.st_mtime)) == (0o644, 1234, 5678, 1_700_000_000)
