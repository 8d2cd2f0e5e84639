"""faust agent: referral events -> notifications (thin loop; the work is `service.record_event`).

An event is acked only once it was applied or dead-lettered (`shared.streams.unacked_events`):
a worker stopped while handling it leaves it unacked, so it comes again after a restart."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import faust

from services.notifications.service import Cause
from shared.events import Envelope
from shared.streams import StreamProcessor, envelope_topic, unacked_events
from shared.topics import Topic, Topics

Handle = Callable[..., Awaitable[None]]  # handle(envelope, *, cause)


def register(app: faust.App, *, topics: Topics, group: str, handle: Handle) -> StreamProcessor:
    proc = StreamProcessor(app=app, topics=topics, group=group)

    @app.agent(envelope_topic(app, topics, Topic.referral_events), concurrency=1, name="referral-events")
    async def referral_events(stream: faust.StreamT) -> None:
        async for event in unacked_events(stream):
            msg = event.message
            cause = Cause(topic=msg.topic, partition=msg.partition, offset=msg.offset, key=msg.key,
                          value=msg.value if isinstance(event.value, Envelope) else None)
            await proc.process(event, functools.partial(handle, cause=cause))
            await stream.ack(event)

    return proc
