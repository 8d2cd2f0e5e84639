"""faust agent: referral events -> notifications (thin loop; the work is `service.record_events`
and `service.record_event`).

Events are taken in batches (`shared.streams.noack_batches`) and applied in one transaction
(`handle_many`); if that fails, the batch is handled again one event at a time through
`StreamProcessor` (`handle`), so a transient error is retried and only a bad event is
dead-lettered. Undecodable messages never enter a batch. Delivery (e-mail, SMS) is not on this
path: the agent only writes the notification rows, the DeliveryLoop sends them.

Acks, as in services/referral/worker.py: an event is acked only once it was applied (its batch
committed, or it was applied on its own) or dead-lettered (`shared.streams`): a worker stopped
while handling a batch leaves the rest unacked, so it comes again after a restart and the inbox
makes that redelivery harmless."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import faust

from services.notifications import service
from services.notifications.deps import Deps
from services.notifications.service import Cause
from shared.events import Envelope
from shared.metrics import CONSUMED, PROCESSING
from shared.streams import StreamProcessor, envelope_topic, noack_batches
from shared.topics import Topic, Topics

log = logging.getLogger("clms.notifications.worker")

Handle = Callable[..., Awaitable[None]]  # handle(envelope, *, cause)
HandleMany = Callable[[list[tuple[Envelope, Cause]]], Awaitable[None]]  # in order, one transaction

BATCH_MAX = 200  # events per transaction at most
BATCH_WITHIN_S = 0.01  # how long a batch waits to fill up (the latency a quiet stream adds)


def cause_of(event: Any) -> Cause:
    msg = event.message
    return Cause(topic=msg.topic, partition=msg.partition, offset=msg.offset, key=msg.key,
                 value=msg.value if isinstance(event.value, Envelope) else None)


def register(app: faust.App, *, topics: Topics, group: str, handle: Handle,
             handle_many: HandleMany | None = None) -> StreamProcessor:
    proc = StreamProcessor(app=app, topics=topics, group=group)

    async def handle_batch(events: list, ack: Callable[[object], Awaitable[object]]) -> None:
        """Apply `events` (in offset order per partition) and ack each one once it is applied or
        dead-lettered; an event not reached (the worker stopped, or an error escaped) stays
        unacked."""
        batch = [e for e in events
                 if isinstance(e.value, Envelope) and e.value.type.startswith("referral.")]
        if handle_many is not None and len(batch) > 1:
            started = time.perf_counter()
            try:
                await handle_many([(e.value, cause_of(e)) for e in batch])
            except Exception as exc:  # noqa: BLE001 - handled again one by one, with the policy
                log.warning("batch of %d referral events failed (%s); applying one by one",
                            len(batch), type(exc).__name__)
            else:
                share = (time.perf_counter() - started) / len(batch)
                applied = {id(e) for e in batch}
                rest = []
                for e in events:  # committed: ack them; the others are handled one by one below
                    if id(e) in applied:
                        CONSUMED.labels(group, e.message.topic, e.value.type, "applied").inc()
                        PROCESSING.labels(group, e.message.topic, e.value.type).observe(share)
                        await ack(e)
                    else:
                        rest.append(e)
                events = rest
        for event in events:
            await proc.process(event, functools.partial(handle, cause=cause_of(event)))
            await ack(event)

    @app.agent(envelope_topic(app, topics, Topic.referral_events), concurrency=1, name="referral-events")
    async def referral_events(stream: faust.StreamT) -> None:
        async for events in noack_batches(stream, BATCH_MAX, within=BATCH_WITHIN_S):
            await handle_batch(list(events), stream.ack)

    return proc


def register_deps(app: faust.App, deps: Deps) -> StreamProcessor:
    """The agent on clms.referral-events, applying events through the use cases with `deps`."""
    return register(app, topics=deps.topics, group=deps.settings.group_id("notifications"),
                    handle=functools.partial(service.apply_event, deps),
                    handle_many=functools.partial(service.apply_events, deps))


async def realert_loop(deps: Deps) -> None:
    """Re-alert the supervisor of each referral.created alert nobody handled in time; a round
    that fails (database away) is tried again next round."""
    interval = max(0.1, min(5.0, deps.settings.realert_after_s / 4))
    while True:
        try:
            await service.realert(deps)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - database away: next round
            log.warning("re-alert round failed: %s", type(exc).__name__)
        await asyncio.sleep(interval)
