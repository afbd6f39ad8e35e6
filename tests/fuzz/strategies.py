"""Hypothesis strategies for hostile protobuf requests.

    requests(pb.CreateContainerRequest)          # any message type, filled by walking its descriptor
    requests(pb.X, overrides={"id": st.just("c1")})   # pin fields by name (at any depth)

Every string, bytes, number, enum, map, repeated and message field is filled (or left unset)
with values chosen for the field's *name*: digests for `digest`, filter strings for `filter(s)`,
field-mask paths for `paths`, label maps for `labels`/`annotations`, media types for `media_type`,
and hostile identifiers (empty, huge, unicode, `../`, NUL bytes, ...) for everything else. Huge
values are built from repetition, so generation stays cheap.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from google.protobuf import descriptor as gd
from hypothesis import strategies as st

# Objects the fuzz conftest seeds into the fuzz namespace: requests name them often enough to
# reach past "not found" into the validation of updates, deletes and tasks.
SEED_IDS = ("c-ok", "c-badspec", "c-listspec", "c-noruntime", "img", "lease1", "base", "active1")
SEED_DIGEST = "sha256:" + hashlib.sha256(b"fuzz seed blob").hexdigest()
VALID_NAMESPACE = "fuzz"

HUGE = 70_000  # bigger than any bound the daemon keeps (ids 76, labels 4096, filters 4096)

hostile_text = st.one_of(
    st.text(max_size=20),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
    st.sampled_from(
        [
            "",
            ".",
            "..",
            "../../etc/passwd",
            "a/../../b",
            "/abs/path",
            "a\x00b",
            "\x00",
            "ünïcödé-名前",
            "\u202etxt",
            "a b",
            "A" * 77,
            "a" * 255,
            "a" * 4097,
            "-leading",
            "trailing-",
            "x" * HUGE,
            "\n",
            "%s%n",
            "'; DROP TABLE containers; --",
        ]
    ),
)


def identifiers() -> st.SearchStrategy[str]:
    """Ids, names, keys, refs: mostly hostile, sometimes valid, sometimes a seeded object's."""
    valid = st.from_regex(r"\A[a-z0-9]([a-z0-9._-]{0,20}[a-z0-9])?\Z")
    seeds = st.sampled_from(SEED_IDS)
    # Mostly valid, so that a request gets past its first field to the next check.
    return st.one_of(valid, seeds, valid, seeds, hostile_text)


def digests() -> st.SearchStrategy[str]:
    hexes = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
    return st.one_of(
        st.just(SEED_DIGEST),
        hexes.map(lambda h: "sha256:" + h),
        st.just(SEED_DIGEST),
        hexes.map(lambda h: "sha256:" + h),
        hexes.map(lambda h: "sha512:" + h),
        hexes.map(lambda h: "SHA256:" + h.upper()),
        st.text(alphabet="0123456789abcdef", max_size=70).map(lambda h: "sha256:" + h),
        st.sampled_from(["", "sha256:", ":", "md5:abc", "sha256:../../x", "sha256:" + "a" * HUGE, "a\x00b"]),
        hostile_text,
    )


def filters() -> st.SearchStrategy[str]:
    fields = st.sampled_from(
        ["id", "name", "labels.a", 'labels."a.b"', "runtime.name", "digest", "kind", "topic", "ref", "type"]
    )
    ops = st.sampled_from(["==", "!=", "~=", "", "=", "<>"])
    values = st.one_of(
        st.sampled_from(["x", '"q"', "/re/", "^a.*$", "(a|a)*b", "[", "(", "\\", "a{1001}", "(?=x)", ""]),
        st.text(max_size=10),
    )
    selector = st.builds(lambda f, o, v: f + o + (v if o else ""), fields, ops, values)
    valid = st.lists(selector, min_size=1, max_size=3).map(",".join)
    return st.one_of(
        valid,
        st.text(max_size=30),
        st.sampled_from(["", ",", "labels.", "name==foo,", '"unterminated', "a" * 5000, "a==" + "b" * HUGE]),
    )


def mask_paths() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(
            [
                "labels",
                "labels.a",
                "labels." + "k" * 5000,
                "image",
                "runtime",
                "spec",
                "snapshotter",
                "snapshot_key",
                "extensions",
                "extensions.x",
                "target",
                "name",
                "annotations",
                "id",
                "created_at",
                "no_such_field",
                "",
                "..",
                "labels.\x00",
            ]
        ),
        hostile_text,
    )


def media_types() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(
            [
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.oci.image.layer.v1.tar+gzip",
                "application/vnd.oci.image.layer.v1.tar",
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "application/vnd.oci.image.layer.v1.tar+zstd",
                "application/octet-stream",
                "text/plain",
            ]
        ),
        hostile_text,
    )


def label_maps() -> st.SearchStrategy[dict[str, str]]:
    small = st.dictionaries(hostile_text, hostile_text, max_size=4)
    return st.one_of(
        small,
        st.just({"k" * 4097: "v"}),
        st.just({"k": "v" * 5000}),
        st.just({f"k{i}": "v" * 100 for i in range(500)}),
        st.just({"containerd.io/gc.ref.content": "sha256:" + "0" * 64}),
        st.just({"containerd.io/gc.expire": "not-a-time"}),
    )


_INT_EDGES = {
    gd.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    gd.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    gd.FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    gd.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    gd.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
    gd.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    gd.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    gd.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    gd.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    gd.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
}


def integers(field: gd.FieldDescriptor) -> st.SearchStrategy[int]:
    low, high = _INT_EDGES[field.type]
    edges = [v for v in (0, 1, -1, 255, 4096, 2**31 - 1, 2**32, 2**62, low, high) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def string_for(name: str) -> st.SearchStrategy[str]:
    if "digest" in name or name == "expected":
        return digests()
    if name == "snapshotter":
        return st.one_of(
            st.sampled_from(["overlayfs", "native"]), st.sampled_from(["overlayfs", "native"]), hostile_text
        )
    if name in ("filter", "filters"):
        return filters()
    if name == "paths":
        return mask_paths()
    if name == "media_type" or name == "mediatype":
        return media_types()
    return identifiers()


def _scalar(field: gd.FieldDescriptor, overrides: Mapping[str, st.SearchStrategy[Any]]) -> st.SearchStrategy:
    t = field.type
    if t == gd.FieldDescriptor.TYPE_STRING:
        return string_for(field.name)
    if t == gd.FieldDescriptor.TYPE_BYTES:
        return st.one_of(
            st.binary(max_size=64),
            st.sampled_from([b"", b"{}", b"[]", b"1", b"null", b'{"ociVersion":"1.0.2"}', b"\xff" * 100]),
        )
    if t == gd.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (gd.FieldDescriptor.TYPE_FLOAT, gd.FieldDescriptor.TYPE_DOUBLE):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if t == gd.FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-5, 100))
    if t == gd.FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, overrides)
    return integers(field)


def _depth_ok(descriptor: gd.Descriptor, depth: int) -> bool:
    return depth < 4


def messages(
    descriptor: gd.Descriptor, overrides: Mapping[str, st.SearchStrategy[Any]] | None = None, depth: int = 0
) -> st.SearchStrategy[dict[str, Any]]:
    """A strategy of {field name: value} for a message descriptor (values for nested messages too)."""
    overrides = overrides or {}
    if descriptor.full_name == "google.protobuf.Timestamp":
        return st.fixed_dictionaries(
            {}, optional={"seconds": st.integers(-(2**40), 2**40), "nanos": st.integers(0, 999_999_999)}
        )
    if descriptor.full_name == "google.protobuf.FieldMask":
        return st.fixed_dictionaries({"paths": st.lists(mask_paths(), max_size=4)})
    if descriptor.full_name == "google.protobuf.Any":
        return st.fixed_dictionaries(
            {},
            optional={
                "type_url": st.one_of(
                    st.sampled_from(
                        [
                            "types.containerd.io/opencontainers/runtime-spec/1/Spec",
                            "types.containerd.io/opencontainers/runtime-spec/1/Process",
                            "containerd.runc.v1.Options",
                            "type.googleapis.com/google.protobuf.Empty",
                        ]
                    ),
                    hostile_text,
                )
                if "type_url" not in overrides
                else overrides["type_url"],
                "value": overrides.get("value", _scalar_bytes()),
            },
        )
    optional: dict[str, st.SearchStrategy[Any]] = {}
    required: dict[str, st.SearchStrategy[Any]] = {}  # plain scalars: always drawn ("" is one choice)
    for field in descriptor.fields:
        if field.name in overrides and field.type in (
            gd.FieldDescriptor.TYPE_STRING,
            gd.FieldDescriptor.TYPE_BYTES,
        ):
            (optional if field.is_repeated else required)[field.name] = overrides[field.name]
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            if value_field.type == gd.FieldDescriptor.TYPE_STRING:
                optional[field.name] = label_maps()
            elif depth < 3:
                optional[field.name] = st.dictionaries(
                    identifiers(), messages(value_field.message_type, overrides, depth + 1), max_size=2
                )
            continue
        if field.type == gd.FieldDescriptor.TYPE_MESSAGE:
            if not _depth_ok(field.message_type, depth):
                continue
            inner = messages(field.message_type, overrides, depth + 1)
        else:
            inner = _scalar(field, overrides)
        if field.is_repeated:
            optional[field.name] = st.lists(inner, max_size=3)
        elif field.type == gd.FieldDescriptor.TYPE_MESSAGE:
            optional[field.name] = inner
        else:
            required[field.name] = inner
    return st.fixed_dictionaries(required, optional=optional)


def _scalar_bytes() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=64),
        st.sampled_from([b"", b"{}", b"[]", b"1", b"null", b'{"ociVersion":"1.0.2"}', b"\xff" * 100]),
        st.sampled_from([b'{"args": ["true"], "cwd": "/"}', b'{"args": 1}', b'{"process": []}']),
    )


def build(message_class: type, values: Mapping[str, Any]) -> Any:
    """A message of message_class from {field: value} as `messages` draws them."""
    message = message_class()
    _fill(message, values)
    return message


def _fill(message: Any, values: Mapping[str, Any]) -> None:
    descriptor = message.DESCRIPTOR
    for name, value in values.items():
        field = descriptor.fields_by_name[name]
        target = getattr(message, name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                if value_field.type == gd.FieldDescriptor.TYPE_MESSAGE:
                    _fill(target[key], item)
                else:
                    target[key] = item
        elif field.is_repeated:
            for item in value:
                if field.type == gd.FieldDescriptor.TYPE_MESSAGE:
                    _fill(target.add(), item)
                else:
                    target.append(item)
        elif field.type == gd.FieldDescriptor.TYPE_MESSAGE:
            target.SetInParent()
            _fill(target, value)
        else:
            setattr(message, name, value)


def requests(message_class: type, overrides: Mapping[str, st.SearchStrategy[Any]] | None = None):
    """A strategy of hostile messages of message_class."""
    return messages(message_class.DESCRIPTOR, overrides).map(lambda values: build(message_class, values))


# Namespaces sent in the containerd-namespace metadata (gRPC metadata must be printable ASCII):
# the fuzz namespace, none at all (the daemon's default), and invalid names.
metadata_namespaces = st.one_of(
    st.just(VALID_NAMESPACE),
    st.just(VALID_NAMESPACE),
    st.just(VALID_NAMESPACE),
    st.just(VALID_NAMESPACE),
    st.none(),
    st.sampled_from(["", "..", "a/b", "-x", "UPPER", "x" * 77, "ns with space", "a..b", "ns_", "%00"]),
)
