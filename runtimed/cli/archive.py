"""`runtimectl import|load` and `runtimectl export|save`: image archives, read and written by the daemon.

The archive streams over the Transfer service in 1 MiB messages either way, so the client never
holds it in memory; the daemon verifies and records what it reads, and builds what it writes.

    runtimectl import app.tar                  # OCI image layout or `docker save` tar; "-" is stdin
    runtimectl load -i app.tar                 # docker's spelling (stdin without -i)
    runtimectl export -o app.tar busybox app:v1
    runtimectl save busybox > busybox.tar      # docker's spelling
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from runtimed.cli.common import CLIError, Context, label_arg
from runtimed.cli.output import human_size
from runtimed.cli.progress import short
from runtimed.cli.pull import platform_messages, transfer_stub
from runtimed.wire import NAMESPACE_KEY

CHUNK = 1 << 20
REDRAW_INTERVAL = 0.1


def register(subparsers: argparse._SubParsersAction) -> None:
    for name, docker in (("import", False), ("load", True)):
        parser = subparsers.add_parser(
            name,
            help="import images from a tar archive" if not docker else "load images from a tar archive",
            description="Import the images of an OCI image layout tar or a `docker save` tar "
            "(what `runtimectl export`, `ctr images export` and `docker save` write). Images are "
            "named from the archive; a bare tag gets --base-name (default import-<date>).",
        )
        if docker:
            parser.add_argument("-i", "--input", default="-", metavar="FILE", help="archive (default: stdin)")
        else:
            parser.add_argument("input", metavar="FILE", help='archive, or "-" for stdin')
        parser.add_argument(
            "--base-name",
            default="",
            metavar="NAME",
            help="name for images the archive names only by tag or not at all; when given, only "
            "images under it are imported",
        )
        add_platform_options(parser, "import (and unpack)")
        parser.add_argument("--no-unpack", action="store_true", help="do not unpack into a snapshotter")
        parser.add_argument(
            "--snapshotter", default="", help="snapshotter to unpack into (default: overlayfs)"
        )
        parser.add_argument(
            "--label",
            action="append",
            default=[],
            type=label_arg,
            metavar="KEY=VALUE",
            help="label the images",
        )
        parser.add_argument("-q", "--quiet", action="store_true", help="print only the image names")
        parser.set_defaults(func=import_images, docker_words=docker)

    for name in ("export", "save"):
        parser = subparsers.add_parser(
            name,
            help="export images to a tar archive",
            description="Write images as one OCI image-layout tar with a docker manifest.json, which "
            "`runtimectl import`, `ctr images import` and `docker load` read.",
        )
        parser.add_argument(
            "names", metavar="NAME", nargs="+", help="image names (busybox finds docker.io/...)"
        )
        parser.add_argument(
            "-o", "--output", default="", metavar="FILE", help="archive file (default: stdout)"
        )
        add_platform_options(parser, "export")
        parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
        parser.set_defaults(func=export_images)


def add_platform_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--platform",
        action="append",
        default=[],
        metavar="OS/ARCH[/VARIANT]",
        help=f"platform to {what} (repeatable; default: the daemon's)",
    )
    parser.add_argument(
        "--all-platforms", action="store_true", help="every platform of a multi-platform image"
    )


class ByteCounter:
    """A one-line `<verb> 12.3MB/45.6MB` on stderr when it is a terminal, redrawn at most every 0.1 s."""

    def __init__(self, verb: str, total: int = 0, *, quiet: bool = False) -> None:
        self.verb = verb
        self.total = total
        self.count = 0
        self.active = not quiet and sys.stderr.isatty()
        self._drawn = 0.0
        self._lock = threading.Lock()  # the request iterator runs in gRPC's thread

    def add(self, n: int) -> None:
        with self._lock:
            self.count += n
            now = time.monotonic()
            if self.active and now - self._drawn >= REDRAW_INTERVAL:
                self._drawn = now
                self._draw()

    def _draw(self) -> None:
        total = f"/{human_size(self.total)}" if self.total else ""
        sys.stderr.write(f"\r\x1b[2K{self.verb} {human_size(self.count)}{total}")
        sys.stderr.flush()

    def clear(self) -> None:
        with self._lock:
            if self.active and self._drawn:
                sys.stderr.write("\r\x1b[2K")
                sys.stderr.flush()
            self.active = False


def _open_input(path: str) -> tuple[BinaryIO, int]:
    if path == "-":
        if sys.stdin.isatty():
            raise CLIError('no archive on stdin: give a FILE (or pipe one into "-")')
        return sys.stdin.buffer, 0
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror}") from None
    size = os.fstat(handle.fileno()).st_size
    return handle, size


def import_images(ctx: Context, args: argparse.Namespace) -> None:
    from runtimed.api.runtimed.services.transfer.v1 import transfer_pb2 as pb

    options = pb.ImportOptions(
        base_name=args.base_name,
        unpack=not args.no_unpack,
        snapshotter=args.snapshotter,
        platforms=platform_messages(args.platform),
        all_platforms=args.all_platforms,
        labels=dict(args.label),
    )
    source, size = _open_input(args.input)
    counter = ByteCounter("Reading", size, quiet=args.quiet)

    def requests() -> Iterator[Any]:
        first = True
        while True:
            data = source.read(CHUNK)
            if first or data:
                yield pb.ImportRequest(options=options if first else None, data=data)
                counter.add(len(data))
            first = False
            if not data:
                return

    started = time.monotonic()
    images = []
    try:
        # No deadline: an import takes as long as the archive needs (Ctrl-C cancels it in the daemon).
        stream = transfer_stub(ctx).Import(requests(), metadata=[(NAMESPACE_KEY, ctx.namespace)])
        for progress in stream:
            if progress.event == "done":
                images.append(progress.image)
            elif progress.event == "unpacking" and not progress.name.startswith("sha256:") and not args.quiet:
                counter.clear()
                print(f"Unpacking {progress.name} ({short(progress.message)})...", flush=True)
    finally:
        counter.clear()
        if source is not sys.stdin.buffer:
            source.close()
    if not images:
        raise CLIError(f"{args.input}: no image imported")
    for image in images:
        if args.quiet:
            print(image.name)
        elif args.docker_words:
            print(f"Loaded image: {image.name}")
        else:
            print(f"Imported {image.name} ({short(image.target.digest)})")
    if not args.quiet:
        seconds = time.monotonic() - started
        print(f"{human_size(counter.count)} read in {seconds:.2f}s", file=sys.stderr)


def export_images(ctx: Context, args: argparse.Namespace) -> None:
    from runtimed.api.runtimed.services.transfer.v1 import transfer_pb2 as pb

    request = pb.ExportRequest(
        names=args.names, platforms=platform_messages(args.platform), all_platforms=args.all_platforms
    )
    to_stdout = args.output in ("", "-")
    if to_stdout and sys.stdout.isatty():
        raise CLIError("refusing to write an archive to a terminal: use -o FILE or redirect stdout")
    counter = ByteCounter("Writing", quiet=args.quiet)
    started = time.monotonic()
    stream = transfer_stub(ctx).Export(request, metadata=[(NAMESPACE_KEY, ctx.namespace)])
    if to_stdout:
        out = sys.stdout.buffer
        for response in stream:
            out.write(response.data)
            counter.add(len(response.data))
        out.flush()
        counter.clear()
        return
    target = Path(args.output)
    # Written beside the target and renamed at the end: a failed export leaves no partial archive.
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        with open(partial, "xb") as out:
            for response in stream:
                out.write(response.data)
                counter.add(len(response.data))
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
    except OSError as exc:
        raise CLIError(f"cannot write {target}: {exc.strerror}") from None
    finally:
        counter.clear()
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    if not args.quiet:
        seconds = time.monotonic() - started
        print(f"Exported {', '.join(args.names)} to {target} ({human_size(counter.count)} in {seconds:.2f}s)")
