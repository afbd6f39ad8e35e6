"""`runtimectl images [ls|rm|tag|inspect]`, `tag`, `inspect`, `rmi`: image records (pull and push
are commands of their own)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from runtimed.cli.common import CLIError, Context, for_each, group
from runtimed.cli.output import (
    add_format_options,
    ago,
    human_size,
    labels_text,
    message_dict,
    print_json,
    render,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    commands = group(subparsers, "images", "manage images", aliases=("image", "i"))

    ls = commands.add_parser(
        "ls",
        aliases=["list"],
        help="list images",
        description="List images, optionally matching containerd filters (e.g. name~=busybox).",
    )
    ls.add_argument("filters", metavar="FILTER", nargs="*")
    add_format_options(ls, quiet="image references")
    ls.set_defaults(func=list_images)

    rm = commands.add_parser(
        "rm",
        aliases=["remove", "delete"],
        help="remove images",
        description="Remove image references (their content is garbage collected).",
    )
    rm.add_argument("refs", metavar="REF", nargs="+")
    rm.add_argument("--sync", action="store_true", help="wait for garbage collection")
    rm.set_defaults(func=remove_images)
    register_docker_commands(subparsers, commands)


def list_images(ctx: Context, args: argparse.Namespace) -> None:
    found = sorted(ctx.client.images(args.filters), key=lambda i: i.name)
    render(
        args,
        found,
        ("REF", "DIGEST", "SIZE", "MEDIA TYPE", "CREATED", "LABELS"),
        lambda i: (
            i.name,
            i.target.digest,
            human_size(i.target.size),
            i.target.media_type,
            ago(i),
            labels_text(i.labels),
        ),
        message_dict,
        lambda i: i.name,
    )


def remove_images(ctx: Context, args: argparse.Namespace) -> int:
    return for_each(
        ctx, args.refs, lambda ref: ctx.client.delete_image(find_image(ctx, ref).name, sync=args.sync)
    )


# -- docker-like commands: `images` (bare), tag, inspect, rmi ---------------------------------


def register_docker_commands(
    subparsers: argparse._SubParsersAction, commands: argparse._SubParsersAction
) -> None:
    """`runtimectl images` lists like `docker images`; tag and inspect exist in the group and at the
    top level (`runtimectl tag`, as docker has both), rmi at the top level."""
    images = subparsers.choices["images"]
    add_format_options(images, quiet="image references")
    images.set_defaults(func=docker_images)

    for where in (commands, subparsers):
        tag = where.add_parser(
            "tag",
            help="give an image another name",
            description="Create (or re-point) image DST with the target of image SRC, like docker tag.",
        )
        tag.add_argument("source", metavar="SRC")
        tag.add_argument("target", metavar="DST")
        tag.set_defaults(func=tag_image)

        inspect = where.add_parser(
            "inspect",
            help="show an image as JSON",
            description="Show an image record with its index, manifest and config decoded (the manifest "
            "for this host's platform when the image is multi-platform).",
        )
        inspect.add_argument("image", metavar="IMAGE")
        inspect.set_defaults(func=inspect_image)

    rmi = subparsers.add_parser("rmi", help="remove images", description="Remove images (as images rm).")
    rmi.add_argument("refs", metavar="REF", nargs="+")
    rmi.add_argument("--sync", action="store_true", help="wait for garbage collection")
    rmi.set_defaults(func=remove_images)


def normalised(name: str) -> str:
    """The reference's canonical form ("busybox" -> "docker.io/library/busybox:latest")."""
    from runtimed.errors import InvalidArgument
    from runtimed.reference import parse

    try:
        return str(parse(name))
    except InvalidArgument as exc:
        raise CLIError(exc.message) from None


def find_image(ctx: Context, name: str) -> Any:
    """The image named exactly so, else the one named by the normalised reference."""
    import grpc

    try:
        return ctx.client.image(name)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        try:
            other = normalised(name)
        except CLIError:
            raise exc from None
        if other == name:
            raise
        try:
            return ctx.client.image(other)
        except grpc.RpcError as again:
            if again.code() == grpc.StatusCode.NOT_FOUND:
                raise exc from None
            raise


def read_blob(ctx: Context, digest: str) -> bytes:
    from runtimed.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
    from runtimed.wire import NAMESPACE_KEY

    stub = content_pb2_grpc.ContentStub(ctx.client.channel)
    chunks = stub.Read(
        content_pb2.ReadContentRequest(digest=digest),
        metadata=[(NAMESPACE_KEY, ctx.namespace)],
        timeout=ctx.timeout,
    )
    return b"".join(chunk.data for chunk in chunks)


def platform_manifest(ctx: Context, target: Any) -> tuple[Any, Any]:
    """(index document or None, the descriptor of the manifest for this host) of an image target."""
    from runtimed.images.manifest import INDEX_TYPES, parse_index, select_manifest
    from runtimed.platforms import Platform
    from runtimed.types import Descriptor

    if target.media_type not in INDEX_TYPES:
        return None, Descriptor(target.media_type, target.digest, target.size)
    data = read_blob(ctx, target.digest)
    return json.loads(data), select_manifest(parse_index(data), Platform.host())


def image_size(ctx: Context, image: Any) -> int | None:
    """Config plus layers of the host platform's manifest (what docker shows); None if unknown."""
    import grpc

    from runtimed.errors import RuntimedError
    from runtimed.images.manifest import parse_manifest

    try:
        _, desc = platform_manifest(ctx, image.target)
        manifest = parse_manifest(read_blob(ctx, desc.digest))
    except (grpc.RpcError, RuntimedError):
        return None
    return manifest.config.size + sum(layer.size for layer in manifest.layers)


def repository_and_tag(name: str) -> tuple[str, str]:
    from runtimed.errors import InvalidArgument
    from runtimed.reference import Reference, parse

    try:
        ref = parse(name, default_tag=None)
    except InvalidArgument:
        return name, "<none>"
    return Reference(ref.host, ref.repository).familiar, ref.tag or "<none>"


def docker_images(ctx: Context, args: argparse.Namespace) -> None:
    found = sorted(ctx.client.images(), key=lambda i: i.name)
    sizes = {} if args.quiet else {image.name: image_size(ctx, image) for image in found}

    def as_dict(image: Any) -> dict[str, Any]:
        return {**message_dict(image), "size": sizes.get(image.name)}

    def row(image: Any) -> tuple[str, ...]:
        repository, tag = repository_and_tag(image.name)
        size = sizes.get(image.name)
        return repository, tag, image.target.digest, "-" if size is None else human_size(size), ago(image)

    render(args, found, ("REPOSITORY", "TAG", "DIGEST", "SIZE", "CREATED"), row, as_dict, lambda i: i.name)


def tag_image(ctx: Context, args: argparse.Namespace) -> None:
    import grpc
    from google.protobuf import field_mask_pb2

    from runtimed.api.containerd.services.images.v1 import images_pb2

    source = find_image(ctx, args.source)
    image = images_pb2.Image(name=normalised(args.target), labels=source.labels, target=source.target)
    try:
        ctx.client.create_image(image)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
        mask = field_mask_pb2.FieldMask(paths=["target"])
        request = images_pb2.UpdateImageRequest(image=image, update_mask=mask)
        ctx.client.call(ctx.client.images_stub.Update, request)


def inspect_image(ctx: Context, args: argparse.Namespace) -> None:
    import grpc

    image = find_image(ctx, args.image)
    result: dict[str, Any] = {"image": message_dict(image)}
    try:
        index, desc = platform_manifest(ctx, image.target)
        if index is not None:
            result["index"] = index
        manifest = json.loads(read_blob(ctx, desc.digest))
        result["manifest"] = manifest
        result["config"] = json.loads(read_blob(ctx, manifest["config"]["digest"]))
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        result["missing"] = exc.details()  # e.g. a platform that was not pulled
    print_json(result)
