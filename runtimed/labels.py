"""Label validation and field-mask updates of label maps, with containerd's rules."""

from __future__ import annotations

from collections.abc import Mapping

from runtimed.errors import InvalidArgument

# containerd bounds each label's key plus value.
MAX_LABEL_SIZE = 4096


def validate(labels: Mapping[str, str], what: str = "labels") -> dict[str, str]:
    for key, value in labels.items():
        if not key:
            raise InvalidArgument(f"{what}: label key must not be empty")
        if len(key) + len(value) > MAX_LABEL_SIZE:
            raise InvalidArgument(
                f"{what}: label key and value greater than maximum size "
                f"({MAX_LABEL_SIZE} bytes), key: {key[:64]}"
            )
    return dict(labels)


def apply_mask_path(current: dict[str, str], incoming: Mapping[str, str], path: str) -> bool:
    """Apply one update-mask path to a label map in place; False if the path is not about labels.

    "labels" replaces the map; "labels.<key>" sets that key from `incoming`, or
    deletes it when `incoming` lacks it or maps it to "".
    """
    if path == "labels":
        current.clear()
        current.update(incoming)
        return True
    if path.startswith("labels."):
        key = path[len("labels.") :]
        value = incoming.get(key, "")
        if value:
            current[key] = value
        else:
            current.pop(key, None)
        return True
    return False
