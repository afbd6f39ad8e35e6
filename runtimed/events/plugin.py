"""The event exchange as a plugin, so services and runtimes find one shared instance."""

from runtimed.events.exchange import Exchange
from runtimed.plugin import PluginType, Registration

PLUGINS = [Registration(type=PluginType.EVENT, id="exchange", init=lambda ctx: Exchange())]
