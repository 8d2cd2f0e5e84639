"""The faust worker: clms.case-events -> referrals (through `StreamProcessor`), and the
deadline scanner that runs next to it.

Events are taken in small batches and applied in one transaction; if that fails, the batch is
handled again one event at a time through `StreamProcessor`, so a transient error is retried and
only a bad event is dead-lettered. Undecodable messages never enter a batch.

Acks: the batches come from `shared.streams.noack_batches` (faust's `noack_take` without its
idle timer), and each event is acked here only once it was
applied (its batch committed, or it was applied on its own) or dead-lettered. faust's
`take_events` would ack every event of a batch in a `finally`, also when the worker was stopped
or failed in the middle of the batch, so events never applied would be committed and lost. An
event that is not acked keeps the committed offset before it, so after a restart (or on the
replica that takes the partition over) it comes again; the inbox makes that redelivery harmless.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import faust

from services.referral import service
from services.referral.deps import Deps
from shared.events import Envelope
from shared.kafka import DeadLetter
from shared.settings import Settings
from shared.streams import StreamProcessor, Undecodable, envelope_topic, make_faust_app, noack_batches
from shared.topics import Topic, Topics

log = logging.getLogger("clms.referral.worker")

BATCH_MAX = 200  # events per transaction at most
BATCH_WITHIN_S = 0.01  # how long a batch waits to fill up (the latency a quiet stream adds)


def build_worker(settings: Settings, deps: Deps,
                 on_dead_letter: Callable[[DeadLetter], None] | None = None
                 ) -> tuple[faust.App, StreamProcessor]:
    app = make_faust_app(settings, service.SERVICE)
    topics = Topics(settings.topic_prefix)
    proc = StreamProcessor(app=app, topics=topics, group=settings.group_id(service.SERVICE),
                           on_dead_letter=on_dead_letter)

    async def handle(envelope: Envelope) -> None:
        opened = await service.apply_case_event(deps, envelope=envelope)
        if opened:
            log.info("opened %d referrals for case %s (event %s)", len(opened), envelope.subject,
                     envelope.id)

    async def handle_batch(events: list, ack: Callable[[object], Awaitable[object]]) -> None:
        """Apply `events` (in offset order per partition) and ack each one once it is applied or
        dead-lettered; an event not reached (the worker stopped, or an error escaped) stays
        unacked."""
        batch = [e for e in events
                 if not isinstance(e.value, Undecodable) and e.value.type.startswith("case.")]
        if len(batch) > 1:
            try:
                opened = await service.apply_case_events(deps, envelopes=[e.value for e in batch])
            except Exception as exc:  # noqa: BLE001 - handled again one by one, with the policy
                log.warning("batch of %d case events failed (%s); applying one by one",
                            len(batch), type(exc).__name__)
            else:
                if any(opened):
                    log.info("opened %d referrals for %d case events", sum(map(len, opened)), len(batch))
                applied = {id(e) for e in batch}
                # The batch is committed. The events left out of it (undecodable, or not a case
                # event) are handled one by one below; acking them here would skip them.
                rest = []
                for e in events:
                    if id(e) in applied:
                        await ack(e)
                    else:
                        rest.append(e)
                events = rest
        for event in events:
            await proc.process(event, handle)
            await ack(event)

    @app.agent(envelope_topic(app, topics, Topic.case_events), concurrency=1,
               name="referral.route-case-events")
    async def route_case_events(stream):  # noqa: ANN001 - faust stream
        async for events in noack_batches(stream, BATCH_MAX, within=BATCH_WITHIN_S):
            await handle_batch(list(events), stream.ack)

    return app, proc


async def deadline_loop(deps: Deps, *, interval_s: float) -> None:
    """Every `interval_s`: escalate what is due. Errors wait for the next round (nothing is lost:
    the deadlines are rows, not timers)."""
    while True:
        try:
            while await service.escalate_due(deps) > 0:
                pass  # a full batch: there may be more
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - database away: try again next round
            log.warning("deadline scan failed (%s: %s); retrying", type(exc).__name__, exc)
        await asyncio.sleep(interval_s)
