"""`runtimectl pull REF`: the daemon pulls (and unpacks) an image, streaming its progress here."""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from typing import Any

from runtimed.cli.common import CLIError, Context, label_arg
from runtimed.cli.progress import PULL_WORDS, ProgressView, short
from runtimed.platforms import Platform
from runtimed.wire import NAMESPACE_KEY


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pull",
        help="pull an image from a registry",
        description="Pull an image from a registry into the daemon and unpack it into a snapshotter. "
        "Credentials come from --user, else from the daemon's docker config.json.",
    )
    parser.add_argument("reference", metavar="REF", help="image reference, e.g. 127.0.0.1:5000/team/app:v1")
    parser.add_argument(
        "--platform",
        action="append",
        default=[],
        metavar="OS/ARCH[/VARIANT]",
        help="platform to pull and unpack (repeatable; default: the daemon's)",
    )
    parser.add_argument(
        "--all-platforms", action="store_true", help="fetch every platform of a multi-platform image"
    )
    parser.add_argument("--no-unpack", action="store_true", help="fetch only; do not unpack")
    parser.add_argument("--snapshotter", default="", help="snapshotter to unpack into (default: overlayfs)")
    parser.add_argument(
        "--label", action="append", default=[], type=label_arg, metavar="KEY=VALUE", help="label the image"
    )
    add_registry_options(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the image name")
    parser.set_defaults(func=pull)


def add_registry_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS, to the registry")
    parser.add_argument(
        "--skip-verify", action="store_true", help="accept a registry certificate that fails to verify"
    )
    parser.add_argument("-u", "--user", default="", metavar="USER[:PASSWORD]", help="registry credentials")
    parser.add_argument("--password-stdin", action="store_true", help="read the password from stdin")


def registry_options(args: argparse.Namespace) -> Any:
    from runtimed.api.runtimed.services.transfer.v1 import transfer_pb2 as pb

    username, _, password = args.user.partition(":")
    if args.password_stdin:
        if not username:
            raise CLIError("--password-stdin needs --user")
        password = sys.stdin.readline().rstrip("\r\n")
    elif username and not password:
        if not sys.stdin.isatty():
            raise CLIError(f"no password for user {username!r}: use --user USER:PASSWORD or --password-stdin")
        password = getpass.getpass(f"Password for {username}: ")
    return pb.RegistryOptions(
        plain_http=args.plain_http, username=username, secret=password, skip_verify=args.skip_verify
    )


def platform_messages(texts: list[str]) -> list[Any]:
    from runtimed.api.containerd.types import platform_pb2

    try:
        platforms = [Platform.parse(text) for text in texts]
    except Exception as exc:
        raise CLIError(str(exc)) from None
    return [platform_pb2.Platform(os=p.os, architecture=p.architecture, variant=p.variant) for p in platforms]


def transfer_stub(ctx: Context) -> Any:
    from runtimed.api.runtimed.services.transfer.v1 import transfer_pb2_grpc

    return transfer_pb2_grpc.TransferStub(ctx.client.channel)


def pull(ctx: Context, args: argparse.Namespace) -> None:
    from runtimed.api.runtimed.services.transfer.v1 import transfer_pb2 as pb

    request = pb.PullRequest(
        reference=args.reference,
        platforms=platform_messages(args.platform),
        all_platforms=args.all_platforms,
        unpack=not args.no_unpack,
        snapshotter=args.snapshotter,
        registry=registry_options(args),
        labels=dict(args.label),
    )
    view = ProgressView(PULL_WORDS, quiet=args.quiet)
    started = time.monotonic()
    # No deadline: a pull takes as long as the registry needs (Ctrl-C cancels it in the daemon).
    stream = transfer_stub(ctx).Pull(request, metadata=[(NAMESPACE_KEY, ctx.namespace)])
    done = view.follow(stream, f"pull of {args.reference}")
    if args.quiet:
        print(done.name)
        return
    print(f"Digest: {done.message}")
    print(f"Pulled {done.name} ({short(done.message)}) in {time.monotonic() - started:.2f}s")
