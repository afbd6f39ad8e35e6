"""The composition root: every built-in plugin module. Nothing else decides what is built in."""

from __future__ import annotations

import importlib

from runtimed.plugin import Registration, Registry

BUILTIN_MODULES = (
    "runtimed.events.plugin",
    "runtimed.metadata.plugin",
    "runtimed.services.version",
    "runtimed.services.namespaces",
    "runtimed.services.introspection",
    "runtimed.services.containers",
    "runtimed.services.images",
    "plugins.snapshotters.overlay",
    "plugins.snapshotters.native",
    "runtimed.services.snapshots",
    "runtimed.services.events",
    "runtimed.content.plugin",
    "runtimed.services.content",
    "runtimed.services.leases",
    "runtimed.gc.plugin",
    "runtimed.diff.plugin",
    "runtimed.services.diff",
    "runtimed.images.service",
    "runtimed.services.transfer",
    "runtimed.volumes.plugin",
    "runtimed.services.volumes",
    "plugins.runtimes.runc",
    "runtimed.tasks.manager",  # after every other plugin (requires "*")
    "runtimed.services.tasks",
)


def builtin_registrations() -> list[Registration]:
    registrations: list[Registration] = []
    for name in BUILTIN_MODULES:
        registrations.extend(importlib.import_module(name).PLUGINS)
    return registrations


def default_registry(*, entry_points: bool = True) -> Registry:
    registry = Registry()
    registry.register_all(builtin_registrations())
    if entry_points:
        registry.load_entry_points()
    return registry
