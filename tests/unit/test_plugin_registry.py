"""The plugin registry: ordering, failures, missing requirements, cycles, config."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtimed.errors import ConfigError, PluginSkipped
from runtimed.plugin import Registration, Registry, close_all, initialise


def reg(type_: str, id_: str, requires=(), init=None, config=None) -> Registration:
    return Registration(
        type=type_,
        id=id_,
        requires=tuple(requires),
        init=init or (lambda ctx: f"{type_}.{id_}"),
        config=config or {},
    )


async def run(registry: Registry, tmp_path: Path, **kwargs):
    return await initialise(
        registry,
        root=tmp_path / "root",
        state=tmp_path / "state",
        address="/tmp/x.sock",
        plugin_config=kwargs.pop("plugin_config", {}),
        **kwargs,
    )


def test_requirements_come_first_whatever_the_registration_order():
    registry = Registry()
    registry.register(reg("t.service", "a", requires=["t.store", "t.events"]))
    registry.register(reg("t.store", "s", requires=["t.events"]))
    registry.register(reg("t.events", "e"))
    order = [r.uri for r in registry.ordered()]
    assert order.index("t.events.e") < order.index("t.store.s") < order.index("t.service.a")


def test_wildcard_requirement_goes_last():
    registry = Registry()
    registry.register(reg("t.last", "x", requires=["*"]))
    registry.register(reg("t.a", "a"))
    registry.register(reg("t.b", "b", requires=["t.a"]))
    assert [r.uri for r in registry.ordered()][-1] == "t.last.x"


def test_cycle_is_rejected_with_the_cycle_named():
    registry = Registry()
    registry.register(reg("t.a", "a", requires=["t.b"]))
    registry.register(reg("t.b", "b", requires=["t.c"]))
    registry.register(reg("t.c", "c", requires=["t.a"]))
    with pytest.raises(ConfigError, match=r"cycle: t\.a\.a -> t\.b\.b -> t\.c\.c -> t\.a\.a"):
        registry.ordered()


def test_invalid_registrations_are_refused_at_once():
    registry = Registry()
    registry.register(reg("t.a", "a"))
    with pytest.raises(ValueError, match="twice"):
        registry.register(reg("t.a", "a"))
    with pytest.raises(ValueError, match="own type"):
        reg("t.a", "b", requires=["t.a"])
    with pytest.raises(ValueError, match="'\\*'"):
        reg("t.a", "c", requires=["*", "t.b"])


async def test_failed_plugin_is_recorded_and_its_dependents_skipped(tmp_path):
    def broken(ctx):
        raise OSError("disk on fire")

    registry = Registry()
    registry.register(reg("t.store", "s", init=broken))
    registry.register(reg("t.service", "needs-store", requires=["t.store"]))
    registry.register(reg("t.other", "independent"))
    plugins = await run(registry, tmp_path)
    by_uri = {p.registration.uri: p for p in plugins}
    assert isinstance(by_uri["t.store.s"].error, OSError)
    dependent = by_uri["t.service.needs-store"]
    assert isinstance(dependent.error, PluginSkipped)
    assert "t.store" in str(dependent.error)
    assert by_uri["t.other.independent"].ok
    assert by_uri["t.other.independent"].instance == "t.other.independent"


async def test_missing_requirement_skips_the_plugin(tmp_path):
    registry = Registry()
    registry.register(reg("t.service", "a", requires=["t.nobody"]))
    plugins = await run(registry, tmp_path)
    (plugin,) = list(plugins)
    assert plugin.skipped
    assert "t.nobody" in str(plugin.error)


async def test_one_working_plugin_of_a_type_satisfies_the_requirement(tmp_path):
    def broken(ctx):
        raise RuntimeError("no")

    registry = Registry()
    registry.register(reg("t.snap", "bad", init=broken))
    registry.register(reg("t.snap", "good"))
    registry.register(
        reg("t.service", "a", requires=["t.snap"], init=lambda ctx: ctx.plugins.get_by_type("t.snap"))
    )
    plugins = await run(registry, tmp_path)
    service = next(p for p in plugins if p.registration.uri == "t.service.a")
    assert service.ok
    assert service.instance == {"good": "t.snap.good"}


async def test_required_plugin_failure_stops_start_up(tmp_path):
    def broken(ctx):
        raise RuntimeError("no kernel support")

    registry = Registry()
    registry.register(reg("t.snap", "bad", init=broken))
    with pytest.raises(ConfigError, match="required plugin t.snap.bad failed to load: no kernel support"):
        await run(registry, tmp_path, required=["t.snap.bad"])


async def test_disabled_plugin_is_not_initialised(tmp_path):
    calls = []
    registry = Registry()
    registry.register(reg("t.a", "a", init=lambda ctx: calls.append("a")))
    plugins = await run(registry, tmp_path, disabled=["t.a.a"])
    assert calls == [] and len(plugins) == 0


async def test_config_section_overrides_defaults_and_unknown_keys_fail(tmp_path):
    registry = Registry()
    registry.register(reg("t.a", "a", init=lambda ctx: dict(ctx.config), config={"size": 1, "mode": "x"}))
    registry.register(reg("t.b", "b", config={"size": 1}))
    plugins = await run(registry, tmp_path, plugin_config={"t.a.a": {"size": 5}, "t.b.b": {"colour": "red"}})
    by_uri = {p.registration.uri: p for p in plugins}
    assert by_uri["t.a.a"].instance == {"size": 5, "mode": "x"}
    assert "unknown config keys for plugin t.b.b: colour" in str(by_uri["t.b.b"].error)


async def test_async_init_and_close_in_reverse_order(tmp_path):
    closed = []

    class Thing:
        def __init__(self, name):
            self.name = name

        async def close(self):
            closed.append(self.name)

    async def make(ctx):
        return Thing(ctx.registration.id)

    registry = Registry()
    registry.register(reg("t.a", "first", init=make))
    registry.register(reg("t.b", "second", requires=["t.a"], init=make))
    plugins = await run(registry, tmp_path)
    await close_all(plugins)
    assert closed == ["second", "first"]


async def test_init_context_gives_each_plugin_its_own_directories(tmp_path):
    def init(ctx):
        ctx.ensure_dirs()
        ctx.exports["root"] = str(ctx.root)
        return ctx.root

    registry = Registry()
    registry.register(reg("t.a", "a", init=init))
    plugins = await run(registry, tmp_path)
    (plugin,) = list(plugins)
    assert plugin.instance == tmp_path / "root" / "t.a.a"
    assert plugin.instance.is_dir()
    assert plugin.exports == {"root": str(tmp_path / "root" / "t.a.a")}


def _install_fake_distribution(site, name: str, entry_points: str, module_source: str) -> None:
    """A minimal installed distribution (dist-info with entry points) on a private sys.path entry."""
    dist_info = site / f"{name}-1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(entry_points)
    (site / f"{name}.py").write_text(module_source)


async def test_third_party_plugins_come_from_entry_points(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _install_fake_distribution(
        site,
        "acme_runtime",
        "[runtimed.plugins]\nacme = acme_runtime:PLUGINS\nbroken = acme_runtime:MISSING\n",
        "from runtimed.plugin import Registration\n"
        "PLUGINS = [Registration(type='io.runtimed.runtime.v1', id='acme', init=lambda ctx: 'acme ready')]\n",
    )
    monkeypatch.syspath_prepend(str(site))
    registry = Registry()
    registry.load_entry_points()
    plugins = {p.registration.uri: p for p in await run(registry, tmp_path)}
    assert plugins["io.runtimed.runtime.v1.acme"].instance == "acme ready"
    broken = plugins["io.runtimed.external.v1.broken"]
    assert isinstance(broken.error, AttributeError)
