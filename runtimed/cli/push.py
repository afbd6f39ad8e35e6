"""`runtimectl push REF [REMOTE]`: the daemon pushes a local image, streaming its progress here."""

from __future__ import annotations

import argparse

from runtimed.cli.common import Context
from runtimed.cli.progress import PUSH_WORDS, ProgressView
from runtimed.cli.pull import add_registry_options, platform_messages, registry_options, transfer_stub
from runtimed.wire import NAMESPACE_KEY


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push",
        help="push an image to a registry",
        description="Push a local image (what the registry lacks of it) to a registry, under REMOTE "
        "if given, else under the image's own name.",
    )
    parser.add_argument("reference", metavar="REF", help="local image name")
    parser.add_argument("remote", metavar="REMOTE", nargs="?", default="", help="where to push it")
    parser.add_argument(
        "--platform", action="append", default=[], metavar="OS/ARCH[/VARIANT]", help="push only this platform"
    )
    add_registry_options(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the pushed digest")
    parser.set_defaults(func=push)


def push(ctx: Context, args: argparse.Namespace) -> None:
    from runtimed.api.runtimed.services.transfer.v1 import transfer_pb2 as pb

    request = pb.PushRequest(
        reference=args.reference,
        remote=args.remote,
        platforms=platform_messages(args.platform),
        registry=registry_options(args),
    )
    view = ProgressView(PUSH_WORDS, quiet=args.quiet)
    stream = transfer_stub(ctx).Push(request, metadata=[(NAMESPACE_KEY, ctx.namespace)])
    done = view.follow(stream, f"push of {args.reference}")
    if args.quiet:
        print(done.message)
    else:
        print(f"{done.name}: digest: {done.message} size: {done.total}")
