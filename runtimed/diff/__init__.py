"""Layers: apply an OCI layer tar onto a snapshot, and write the diff of two snapshots as a layer.

The gRPC Diff service (runtimed.services.diff) is a thin edge over these two synchronous functions;
callers run them in a thread.
"""

from runtimed.diff.apply import Applied, DevicePolicy, apply_layer
from runtimed.diff.mediatypes import Compression, compression_of, is_layer
from runtimed.diff.write import WrittenDiff, write_diff

__all__ = [
    "Applied",
    "Compression",
    "DevicePolicy",
    "WrittenDiff",
    "apply_layer",
    "compression_of",
    "is_layer",
    "write_diff",
]
