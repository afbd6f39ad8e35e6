"""The "walking" differ (io.containerd.differ.v1.walking): apply_layer and write_diff for async callers.

The gRPC Diff service and the unpacker use this instance; the work runs in worker threads so the
event loop never blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from runtimed.diff.apply import Applied, DevicePolicy, apply_layer
from runtimed.diff.mediatypes import LAYER_TAR_GZIP, compression_of
from runtimed.diff.write import WrittenDiff, write_diff
from runtimed.errors import ConfigError
from runtimed.plugin import InitContext, PluginType, Registration
from runtimed.types import Mount


class WalkingDiffer:
    def __init__(self, devices: DevicePolicy | str = DevicePolicy.REJECT) -> None:
        self.devices = DevicePolicy(devices)

    async def apply(self, blob: Path | BinaryIO, media_type: str, mounts: Sequence[Mount]) -> Applied:
        """Apply a layer blob (media type of the manifest's layer descriptor) onto snapshot mounts."""
        compression_of(media_type)  # an unknown media type fails before any thread starts
        return await asyncio.to_thread(apply_layer, blob, media_type, list(mounts), devices=self.devices)

    async def diff(
        self,
        lower: Sequence[Mount],
        upper: Sequence[Mount],
        out: BinaryIO,
        media_type: str = LAYER_TAR_GZIP,
    ) -> WrittenDiff:
        """Write the layer from `lower` to `upper` to `out`; `media_type` picks the compression."""
        compression = compression_of(media_type or LAYER_TAR_GZIP)
        return await asyncio.to_thread(write_diff, list(lower), list(upper), out, compression)


def _init(ctx: InitContext) -> WalkingDiffer:
    devices = ctx.config.get("devices", DevicePolicy.REJECT)
    try:
        return WalkingDiffer(devices=devices)
    except ValueError:
        choices = ", ".join(repr(p.value) for p in DevicePolicy)
        raise ConfigError(f"differ walking: devices = {devices!r}, expected one of {choices}") from None


PLUGINS = [
    Registration(
        type=PluginType.DIFFER,
        id="walking",
        init=_init,
        # "reject" (default) refuses layers with device nodes, "skip" leaves them out,
        # "create" creates them as containerd does.
        config={"devices": DevicePolicy.REJECT.value},
    )
]
