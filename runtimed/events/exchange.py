"""The event exchange: publishers post envelopes, each subscriber has its own queue.

A slow subscriber only grows its own (bounded) queue; when it overflows, that
subscriber is dropped with an error instead of stalling publishers or other
subscribers. There is no replay: a subscriber sees events published after it joined.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import structlog
from google.protobuf.message import Message

from runtimed import filters, identifiers
from runtimed.errors import InvalidArgument, ResourceExhausted, q
from runtimed.types import now_ns

log = structlog.get_logger("runtimed.events")

SUBSCRIBER_QUEUE_SIZE = 4096


@dataclass(frozen=True)
class Envelope:
    timestamp: int  # ns since the epoch
    namespace: str
    topic: str
    event_type: str  # full protobuf message name, containerd's bare type URL
    event: bytes  # the serialised event message

    def field(self, path: Sequence[str]) -> tuple[str, bool]:
        """Filter adaptor: topic, namespace and event.<field> of the decoded event."""
        if not path:
            return "", False
        if path[0] == "topic" and len(path) == 1:
            return self.topic, True
        if path[0] == "namespace" and len(path) == 1:
            return self.namespace, True
        if path[0] == "event" and len(path) > 1:
            return _event_field(self.event_type, self.event, path[1:])
        return "", False


def _event_field(event_type: str, data: bytes, path: Sequence[str]) -> tuple[str, bool]:
    from google.protobuf import symbol_database

    try:
        cls = symbol_database.Default().GetSymbol(event_type)
    except KeyError:
        return "", False
    message: object = cls.FromString(data)
    for part in path:
        if isinstance(message, Message):
            if part not in message.DESCRIPTOR.fields_by_name:
                return "", False
            message = getattr(message, part)
        elif hasattr(message, "get"):  # a protobuf map
            if part not in message:
                return "", False
            message = message[part]
        else:
            return "", False
    if isinstance(message, Message):
        return "", True
    return str(message), True


def validate_topic(topic: str) -> str:
    if not topic or not topic.startswith("/"):
        raise InvalidArgument(f"topic {q(topic)} must start with '/'")
    for component in topic[1:].split("/"):
        identifiers.validate(component, f"topic {q(topic)} component")
    return topic


class Subscription:
    def __init__(self, exchange: Exchange, matcher: filters.Filter) -> None:
        self._exchange = exchange
        self._matcher = matcher
        self._queue: asyncio.Queue[Envelope | BaseException] = asyncio.Queue(SUBSCRIBER_QUEUE_SIZE)

    def offer(self, envelope: Envelope) -> None:
        if not self._matcher.match(envelope.field):
            return
        try:
            self._queue.put_nowait(envelope)
        except asyncio.QueueFull:
            self._exchange._subscribers.discard(self)
            # Make room so the subscriber learns why it was dropped.
            self._queue.get_nowait()
            self._queue.put_nowait(ResourceExhausted("event subscriber too slow, events were dropped"))

    async def __aiter__(self) -> AsyncIterator[Envelope]:
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._exchange._subscribers.discard(self)


class Exchange:
    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()

    def publish(self, namespace: str, topic: str, event: Message) -> Envelope:
        """Publish one of runtimed's own events (a containerd event message)."""
        return self.publish_encoded(namespace, topic, event.DESCRIPTOR.full_name, event.SerializeToString())

    def publish_encoded(self, namespace: str, topic: str, event_type: str, event: bytes) -> Envelope:
        """Publish an already-encoded event, e.g. one a client sent through Events.Publish."""
        envelope = Envelope(
            timestamp=now_ns(), namespace=namespace, topic=topic, event_type=event_type, event=event
        )
        self.forward(envelope)
        return envelope

    def forward(self, envelope: Envelope) -> None:
        log.debug("event", namespace=envelope.namespace, topic=envelope.topic)
        for subscriber in list(self._subscribers):
            subscriber.offer(envelope)

    def subscribe(self, filter_exprs: Sequence[str] = ()) -> Subscription:
        subscription = Subscription(self, filters.parse_all(filter_exprs))
        self._subscribers.add(subscription)
        return subscription
