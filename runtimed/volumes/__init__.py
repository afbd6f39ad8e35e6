"""Volumes: named, namespaced directories under the daemon's root that outlive containers."""

from runtimed.volumes.store import Volume, VolumeStore, validate_name

__all__ = ["Volume", "VolumeStore", "validate_name"]
