"""What a runtime backend plugin gives the task manager, and how runtime names select one.

A backend is a plugin of type io.runtimed.runtime.v1 whose instance is a `Runtime`: the runtime
names that select it (a container's runtime.name, e.g. `ctr run --runtime io.containerd.runc.v2`)
and a factory of `shim.api.Shim` objects, one per task. A backend that cannot work on this host
raises PluginSkipped from its init with the reason; asking for its runtime then fails with that
reason instead of a bare "not found".
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtimed.errors import FailedPrecondition, NotFound, q
from runtimed.plugin import Plugin, PluginType
from runtimed.tasks.client import ShimClient
from runtimed.types import AnyValue
from shim.api import Shim

# Runtime names with a backend planned in runtimed, so an unavailable one is explained.
KNOWN_RUNTIMES = {
    "io.containerd.runc.v2": "runc",
    "io.containerd.runc.v1": "runc",
    "runc": "runc",
    "io.runtimed.native.v1": "native",
    "native": "native",
    "io.containerd.runsc.v1": "gvisor",
    "gvisor": "gvisor",
    "runsc": "gvisor",
    "io.containerd.kata.v2": "kata",
    "kata": "kata",
}


@dataclass
class TaskContext:
    """What a backend's task is built with."""

    namespace: str
    container_id: str
    runtime: str  # the name the container asked for
    bundle: Path
    shim: ShimClient  # the shim process that supervises this task's processes
    # Called by the backend when the kernel OOM-killed a process of the container (/tasks/oom).
    on_oom: Callable[[], None] = field(default=lambda: None)


class Runtime(abc.ABC):
    """A runtime backend: the instance its plugin's init returns."""

    #: the runtime names that select this backend; the first is its canonical name
    names: tuple[str, ...] = ()

    def decode_options(self, options: AnyValue | None) -> dict[str, Any]:
        """The task's runtime options (CreateTaskRequest.options or the container's runtime
        options, a protobuf Any) as a JSON-able dict; InvalidArgument when malformed."""
        return {}

    @abc.abstractmethod
    def new_task(self, context: TaskContext, options: dict[str, Any]) -> Shim:
        """A Shim for one task; nothing runs until its create() (or restore())."""


class Runtimes:
    """Runtime name -> backend, over every runtime plugin, working or not (looked up at each
    call: the plugin set is live, and a third-party backend may be initialised late)."""

    def __init__(self, plugins: Iterable[Plugin], default: str) -> None:
        self.default = default
        self._plugins = plugins

    def _scan(self) -> tuple[dict[str, Runtime], dict[str, Plugin]]:
        by_name: dict[str, Runtime] = {}
        failed: dict[str, Plugin] = {}
        for plugin in self._plugins:
            if plugin.registration.type != PluginType.RUNTIME:
                continue
            if plugin.ok and isinstance(plugin.instance, Runtime):
                for name in plugin.instance.names:
                    by_name.setdefault(name, plugin.instance)
            else:
                failed[plugin.registration.id] = plugin
        return by_name, failed

    @property
    def names(self) -> list[str]:
        return sorted(self._scan()[0])

    def resolve(self, name: str) -> tuple[str, Runtime]:
        """(runtime name, backend); raises NotFound or FailedPrecondition naming the runtime."""
        name = name or self.default
        by_name, failed_plugins = self._scan()
        runtime = by_name.get(name)
        if runtime is not None:
            return name, runtime
        backend_id = KNOWN_RUNTIMES.get(name)
        failed = failed_plugins.get(backend_id or "")
        if failed is not None:
            raise FailedPrecondition(
                f"runtime {q(name)} is not available: plugin {failed.registration.uri}: {failed.error}"
            )
        if backend_id is not None:
            raise NotFound(f"runtime {q(name)}: no {PluginType.RUNTIME}.{backend_id} plugin is installed")
        known = ", ".join(sorted(by_name)) or "none"
        raise NotFound(f"runtime {q(name)} is not known to runtimed (available: {known})")
