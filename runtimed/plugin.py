"""The plugin registry: every piece of the daemon is a plugin with a type, an id and requirements.

A plugin registers a `Registration`; the daemon orders all registrations by their
requirements (plugin *types*, like containerd), then initialises them one by one.
A plugin whose init fails is recorded with its error and skipped; every plugin that
requires its type and finds no working plugin of that type is skipped too. Nothing
stops the daemon unless the configuration lists the plugin as required.

Built-in plugins are listed in runtimed.builtins; third-party ones are Python
packages exposing an entry point in the group `runtimed.plugins` whose object is
either a `Registration`, an iterable of them, or a callable returning either.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import Any

import structlog

from runtimed.errors import ConfigError, FailedPrecondition, NotFound, PluginSkipped
from runtimed.platforms import Platform

log = structlog.get_logger("runtimed.plugin")

ENTRY_POINT_GROUP = "runtimed.plugins"
ALL = "*"


class PluginType(StrEnum):
    """Plugin types; containerd's names where the role is containerd's."""

    METADATA = "io.containerd.metadata.v1"
    CONTENT = "io.containerd.content.v1"
    SNAPSHOTTER = "io.containerd.snapshotter.v1"
    DIFFER = "io.containerd.differ.v1"
    EVENT = "io.containerd.event.v1"
    GC = "io.containerd.gc.v1"
    LEASE = "io.containerd.lease.v1"
    SERVICE = "io.containerd.service.v1"
    GRPC = "io.containerd.grpc.v1"
    INTERNAL = "io.containerd.internal.v1"
    # Runtime backends (runc, native, gvisor, kata) behind the common shim interface.
    RUNTIME = "io.runtimed.runtime.v1"
    # Anything loaded from an entry point that could not even be registered.
    EXTERNAL = "io.runtimed.external.v1"


InitFn = Callable[["InitContext"], Any]


@dataclass(frozen=True)
class Registration:
    type: str
    id: str
    init: InitFn
    requires: tuple[str, ...] = ()
    # Default configuration; the daemon's TOML section [plugins."<uri>"] overrides keys.
    config: Mapping[str, Any] = field(default_factory=dict)
    platforms: tuple[Platform, ...] = ()
    capabilities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.type or not self.id:
            raise ValueError("plugin registration needs a type and an id")
        if self.type in self.requires:
            raise ValueError(f"plugin {self.uri} requires its own type")
        if ALL in self.requires and len(self.requires) > 1:
            raise ValueError(f"plugin {self.uri}: '*' cannot be combined with other requirements")

    @property
    def uri(self) -> str:
        return f"{self.type}.{self.id}"


@dataclass
class Plugin:
    """The outcome of one plugin's initialisation, as Introspection reports it."""

    registration: Registration
    instance: Any = None
    error: BaseException | None = None
    exports: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def skipped(self) -> bool:
        return isinstance(self.error, PluginSkipped)


class PluginSet:
    """The initialised plugins, in init order; what InitContext lookups search."""

    def __init__(self) -> None:
        self._ordered: list[Plugin] = []
        self._by_uri: dict[str, Plugin] = {}

    def add(self, plugin: Plugin) -> None:
        self._ordered.append(plugin)
        self._by_uri[plugin.registration.uri] = plugin

    def __iter__(self):
        return iter(self._ordered)

    def __len__(self) -> int:
        return len(self._ordered)

    def get(self, type_: str, id_: str) -> Any:
        plugin = self._by_uri.get(f"{type_}.{id_}")
        if plugin is None:
            raise NotFound(f"plugin {type_}.{id_}")
        if plugin.error is not None:
            raise FailedPrecondition(f"plugin {type_}.{id_} failed to load: {plugin.error}")
        return plugin.instance

    def get_by_type(self, type_: str) -> dict[str, Any]:
        """Every working plugin of a type, by id."""
        return {p.registration.id: p.instance for p in self._ordered if p.registration.type == type_ and p.ok}

    def get_single(self, type_: str) -> Any:
        working = self.get_by_type(type_)
        if len(working) != 1:
            raise FailedPrecondition(
                f"expected exactly one working plugin of type {type_}, have {len(working)}"
            )
        return next(iter(working.values()))


@dataclass
class InitContext:
    """What a plugin's init receives: its own directories and config, the daemon's facts."""

    registration: Registration
    root: Path  # persistent, <daemon root>/<plugin uri>
    state: Path  # volatile, <daemon state>/<plugin uri>
    config: dict[str, Any]
    plugins: PluginSet
    daemon_root: Path
    daemon_state: Path
    address: str
    exports: dict[str, str] = field(default_factory=dict)

    def ensure_dirs(self) -> None:
        """Create the plugin's root and state directories (0700) on first use."""
        for directory in (self.root, self.state):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)


class Registry:
    """Holds registrations; validates them eagerly and orders them by requirement."""

    def __init__(self) -> None:
        self._registrations: dict[str, Registration] = {}
        self.load_errors: list[Plugin] = []

    def register(self, registration: Registration) -> None:
        if registration.uri in self._registrations:
            raise ValueError(f"plugin {registration.uri} registered twice")
        self._registrations[registration.uri] = registration

    def register_all(self, registrations: Iterable[Registration]) -> None:
        for registration in registrations:
            self.register(registration)

    def __iter__(self):
        return iter(self._registrations.values())

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Register third-party plugins; a broken package is recorded, never fatal."""
        for entry_point in metadata.entry_points(group=group):
            try:
                registrations = _as_registrations(entry_point.load())
                self.register_all(registrations)
            except Exception as exc:  # a third-party package must not stop the daemon
                log.warning("plugin entry point failed to load", entry_point=entry_point.name, error=str(exc))
                placeholder = Registration(type=PluginType.EXTERNAL, id=entry_point.name, init=_never)
                self.load_errors.append(Plugin(placeholder, error=exc))

    def ordered(self, disabled: Iterable[str] = ()) -> list[Registration]:
        """Registrations with requirements first; raises ConfigError on a cycle."""
        disabled = set(disabled)
        candidates = {uri: r for uri, r in self._registrations.items() if uri not in disabled}
        by_type: dict[str, list[Registration]] = {}
        for registration in candidates.values():
            by_type.setdefault(registration.type, []).append(registration)

        order: list[Registration] = []
        done: set[str] = set()
        visiting: list[str] = []

        def visit(registration: Registration) -> None:
            if registration.uri in done:
                return
            if registration.uri in visiting:
                cycle = " -> ".join([*visiting[visiting.index(registration.uri) :], registration.uri])
                raise ConfigError(f"plugin dependency cycle: {cycle}")
            visiting.append(registration.uri)
            if ALL not in registration.requires:
                for required_type in registration.requires:
                    for dependency in by_type.get(required_type, []):
                        visit(dependency)
            visiting.pop()
            done.add(registration.uri)
            order.append(registration)

        # "*" plugins go after everything else, in registration order.
        for registration in candidates.values():
            if ALL not in registration.requires:
                visit(registration)
        for registration in candidates.values():
            visit(registration)
        return order


def _never(_: InitContext) -> None:
    raise RuntimeError("placeholder plugin is never initialised")


def _as_registrations(obj: Any) -> list[Registration]:
    if callable(obj) and not isinstance(obj, Registration):
        obj = obj()
    if isinstance(obj, Registration):
        return [obj]
    registrations = list(obj)
    for item in registrations:
        if not isinstance(item, Registration):
            raise TypeError(f"entry point yielded {type(item).__name__}, not a Registration")
    return registrations


async def initialise(
    registry: Registry,
    *,
    root: Path,
    state: Path,
    address: str,
    plugin_config: Mapping[str, Mapping[str, Any]],
    disabled: Iterable[str] = (),
    required: Iterable[str] = (),
) -> PluginSet:
    """Initialise every registered plugin in dependency order.

    Raises ConfigError when a plugin named in `required` fails; every other failure
    is recorded on the plugin and logged.
    """
    plugins = PluginSet()
    for failed in registry.load_errors:
        plugins.add(failed)
    required = set(required)
    types_tried: dict[str, bool] = {}  # type -> whether any plugin of it works

    for registration in registry.ordered(disabled):
        uri = registration.uri
        logger = log.bind(plugin=uri)
        missing = [t for t in registration.requires if t != ALL and not types_tried.get(t, False)]
        plugin = Plugin(registration)
        if missing:
            plugin.error = PluginSkipped(
                "required plugin type " + ", ".join(missing) + " has no working plugin"
            )
        else:
            config = {**registration.config, **plugin_config.get(uri, {})}
            unknown = set(plugin_config.get(uri, {})) - set(registration.config)
            ctx = InitContext(
                registration=registration,
                root=root / uri,
                state=state / uri,
                config=config,
                plugins=plugins,
                daemon_root=root,
                daemon_state=state,
                address=address,
            )
            try:
                if unknown:
                    raise ConfigError(f"unknown config keys for plugin {uri}: {', '.join(sorted(unknown))}")
                logger.debug("loading plugin")
                result = registration.init(ctx)
                if inspect.isawaitable(result):
                    result = await result
                plugin.instance = result
                plugin.exports = ctx.exports
            except Exception as exc:
                plugin.error = exc
        if plugin.error is not None:
            if isinstance(plugin.error, PluginSkipped):
                logger.info("skip loading plugin", reason=str(plugin.error))
            else:
                logger.warning("failed to load plugin", error=str(plugin.error))
            if uri in required:
                raise ConfigError(f"required plugin {uri} failed to load: {plugin.error}")
        types_tried[registration.type] = types_tried.get(registration.type, False) or plugin.ok
        plugins.add(plugin)
    for uri in required:
        if uri not in {p.registration.uri for p in plugins}:
            raise ConfigError(f"required plugin {uri} is not registered or is disabled")
    return plugins


async def close_all(plugins: PluginSet) -> None:
    """Close every working plugin instance that has close(), in reverse init order."""
    for plugin in reversed(list(plugins)):
        close = getattr(plugin.instance, "close", None) if plugin.ok else None
        if close is None:
            continue
        try:
            result = close()
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            log.warning("plugin close failed", plugin=plugin.registration.uri, error=str(exc))


def host_platform() -> Platform:
    return Platform.host()
