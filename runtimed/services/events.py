"""Events service: Publish and Forward into the exchange, Subscribe as a stream of envelopes."""

from __future__ import annotations

from google.protobuf import any_pb2, empty_pb2

from runtimed import identifiers
from runtimed.api.containerd.services.events.v1 import events_pb2 as pb
from runtimed.api.containerd.services.events.v1 import events_pb2_grpc as pb_grpc
from runtimed.errors import InvalidArgument
from runtimed.events.exchange import Envelope, Exchange, validate_topic
from runtimed.plugin import PluginType
from runtimed.server.interceptors import current_namespace
from runtimed.services import convert
from runtimed.services.base import grpc_plugin


def envelope_to_pb(envelope: Envelope) -> pb.Envelope:
    # containerd's clients resolve events by the bare message name, never type.googleapis.com/...
    return pb.Envelope(
        timestamp=convert.timestamp(envelope.timestamp),
        namespace=envelope.namespace,
        topic=envelope.topic,
        event=any_pb2.Any(type_url=envelope.event_type, value=envelope.event),
    )


class EventsServicer(pb_grpc.EventsServicer):
    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange

    async def Publish(self, request, context):
        namespace = current_namespace()
        validate_topic(request.topic)
        if not request.HasField("event") or not request.event.type_url:
            raise InvalidArgument("event must be set with a type url")
        self._exchange.publish_encoded(namespace, request.topic, request.event.type_url, request.event.value)
        return empty_pb2.Empty()

    async def Forward(self, request, context):
        envelope = request.envelope
        identifiers.validate(envelope.namespace, "envelope namespace")
        validate_topic(envelope.topic)
        if not envelope.HasField("timestamp") or envelope.timestamp.ToNanoseconds() <= 0:
            raise InvalidArgument("envelope timestamp must be set")
        if not envelope.event.type_url:
            raise InvalidArgument("envelope event must be set with a type url")
        self._exchange.forward(
            Envelope(
                timestamp=envelope.timestamp.ToNanoseconds(),
                namespace=envelope.namespace,
                topic=envelope.topic,
                event_type=envelope.event.type_url,
                event=envelope.event.value,
            )
        )
        return empty_pb2.Empty()

    async def Subscribe(self, request, context):
        # Not namespace-scoped: like containerd, a subscriber sees every namespace unless its
        # filters say otherwise (namespace==...).
        async for envelope in self._exchange.subscribe(list(request.filters)):
            yield envelope_to_pb(envelope)


PLUGINS = [
    grpc_plugin(
        "events",
        "containerd.services.events.v1.Events",
        lambda ctx: EventsServicer(ctx.plugins.get_single(PluginType.EVENT)),
        pb_grpc.add_EventsServicer_to_server,
        requires=[PluginType.EVENT],
    )
]
