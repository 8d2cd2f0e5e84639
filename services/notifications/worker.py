"""faust agent: referral events -> notifications (thin loop; the work is `service.record_event`)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import faust

from services.notifications.service import Cause
from shared.events import Envelope
from shared.streams import StreamProcessor, envelope_topic
from shared.topics import Topic, Topics

Handle = Callable[..., Awaitable[None]]  # handle(envelope, *, cause)


def register(app: faust.App, *, topics: Topics, group: str, handle: Handle) -> StreamProcessor:
    proc = StreamProcessor(app=app, topics=topics, group=group)

    @app.agent(envelope_topic(app, topics, Topic.referral_events), concurrency=1, name="referral-events")
    async def referral_events(stream: faust.StreamT) -> None:
        async for event in stream.events():
            msg = event.message
            cause = Cause(topic=msg.topic, partition=msg.partition, offset=msg.offset, key=msg.key,
                          value=msg.value if isinstance(event.value, Envelope) else None)
            await proc.process(event, functools.partial(handle, cause=cause))

    return proc
