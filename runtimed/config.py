"""Daemon configuration: a TOML file with a section per plugin, overridden by flags.

version = 1
root = "/var/lib/runtimed"
state = "/run/runtimed"
disabled_plugins = []
required_plugins = []

[grpc]
address = "/run/runtimed/runtimed.sock"
uid = 0
gid = 0

[debug]
level = "info"

[plugins."io.containerd.metadata.v1.sqlite"]
...
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from runtimed.errors import ConfigError
from runtimed.plugin import Registration
from runtimed.wire import DEFAULT_SOCKET
from runtimed.wire import MAX_MESSAGE_SIZE as DEFAULT_MAX_MESSAGE_SIZE

CONFIG_VERSION = 1
DEFAULT_ROOT = "/var/lib/runtimed"
DEFAULT_STATE = "/run/runtimed"
DEFAULT_CONFIG_PATH = "/etc/runtimed/config.toml"
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class GrpcConfig:
    address: str = DEFAULT_SOCKET
    # Owner of the socket; mode stays 0600 unless a group is given (then 0660).
    uid: int = 0
    gid: int = 0
    max_recv_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_send_message_size: int = DEFAULT_MAX_MESSAGE_SIZE


@dataclass
class DaemonConfig:
    root: str = DEFAULT_ROOT
    state: str = DEFAULT_STATE
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    log_level: str = "info"
    # "auto": console in a terminal, JSON otherwise.
    log_format: str = "auto"
    disabled_plugins: list[str] = field(default_factory=list)
    required_plugins: list[str] = field(default_factory=list)
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"config: {where} must be a {name}, got {value!r}")
    return value


def _string_list(value: Any, where: str) -> list[str]:
    items = _expect(value, list, where)
    for item in items:
        _expect(item, str, where + "[]")
    return list(items)


def parse(document: Mapping[str, Any]) -> DaemonConfig:
    """Validate a decoded TOML document into a DaemonConfig, naming any bad key."""
    config = DaemonConfig()
    known = {"version", "root", "state", "grpc", "debug", "disabled_plugins", "required_plugins", "plugins"}
    unknown = set(document) - known
    if unknown:
        raise ConfigError(f"config: unknown keys: {', '.join(sorted(unknown))}")
    version = document.get("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise ConfigError(f"config: version {version!r} is not supported (expected {CONFIG_VERSION})")
    config.root = _expect(document.get("root", config.root), str, "root")
    config.state = _expect(document.get("state", config.state), str, "state")
    grpc_section = _expect(document.get("grpc", {}), dict, "grpc")
    for key, value in grpc_section.items():
        if not hasattr(config.grpc, key):
            raise ConfigError(f"config: unknown key grpc.{key}")
        setattr(config.grpc, key, _expect(value, type(getattr(config.grpc, key)), f"grpc.{key}"))
    debug = _expect(document.get("debug", {}), dict, "debug")
    for key in set(debug) - {"level", "format"}:
        raise ConfigError(f"config: unknown key debug.{key}")
    config.log_level = _expect(debug.get("level", config.log_level), str, "debug.level")
    config.log_format = _expect(debug.get("format", config.log_format), str, "debug.format")
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(f"config: debug.level must be one of {', '.join(LOG_LEVELS)}")
    if config.log_format not in ("auto", "json", "console"):
        raise ConfigError("config: debug.format must be auto, json or console")
    config.disabled_plugins = _string_list(document.get("disabled_plugins", []), "disabled_plugins")
    config.required_plugins = _string_list(document.get("required_plugins", []), "required_plugins")
    plugins = _expect(document.get("plugins", {}), dict, "plugins")
    for uri, section in plugins.items():
        config.plugins[uri] = dict(_expect(section, dict, f'plugins."{uri}"'))
    return config


def load(path: str | Path, *, missing_ok: bool) -> DaemonConfig:
    """Read a config file; a missing file gives the defaults when missing_ok."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        if missing_ok:
            return DaemonConfig()
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    return parse(document)


def render_default(registrations: Iterable[Registration]) -> str:
    """The default configuration, including each plugin's defaults, as TOML."""
    defaults = DaemonConfig()
    document: dict[str, Any] = {
        "version": CONFIG_VERSION,
        "root": defaults.root,
        "state": defaults.state,
        "disabled_plugins": [],
        "required_plugins": [],
        "grpc": vars(defaults.grpc),
        "debug": {"level": defaults.log_level, "format": defaults.log_format},
        "plugins": {r.uri: dict(r.config) for r in sorted(registrations, key=lambda r: r.uri) if r.config},
    }
    return tomli_w.dumps(document)
