"""The content store: content-addressed blobs shared on disk, visible per namespace."""

from runtimed.content.store import ContentStore, Writer
from runtimed.content.types import ContentInfo, IngestStatus

__all__ = ["ContentInfo", "ContentStore", "IngestStatus", "Writer"]
