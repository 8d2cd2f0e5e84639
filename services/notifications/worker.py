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

from services.notifications import rules, service
from services.notifications.deps import Deps
from services.notifications.service import Cause
from shared.events import Envelope
from shared.metrics import CONSUMED, PROCESSING
from shared.streams import StreamProcessor, envelope_topic, noack_batches
from shared.topics import Topic, Topics
from shared.wakeup import Alarm

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


class RealertLoop:
    """Re-alerts the supervisor of each referral.created alert nobody handled within
    REALERT_AFTER_S (`service.realert`). Between rounds it sleeps until the earliest re-alert
    falls due, at most NOTIFY_POLL_INTERVAL_S (a safety net), and is woken earlier by
    `referral_recorded()` when a commit may have recorded a referral whose re-alert falls due
    before its sleep ends (issue 18: no polling). A round that fails (database away) is tried
    again after a pause."""

    def __init__(self, *, after_s: float, cap_s: float):
        self.after_s = after_s
        self.cap_s = cap_s
        self.alarm = Alarm()

    def referral_recorded(self) -> None:
        """After a commit that applied referral events: a referral recorded now has its re-alert
        due in `after_s`; ring unless the loop wakes before that anyway (so, under load, not
        once per batch)."""
        self.alarm.ring_if_due_before(self.after_s)

    async def run(self, deps: Deps) -> None:
        while True:
            try:
                delay = rules.sleep_until_due(await service.realert(deps), cap_s=self.cap_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - database away: next round
                log.warning("re-alert round failed: %s", type(exc).__name__)
                delay = min(self.cap_s, 5.0)
            await self.alarm.wait(delay)
