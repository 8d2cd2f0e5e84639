"""The faust worker: clms.case-events -> referrals (through `StreamProcessor`), and the
deadline scanner that runs next to it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import faust

from services.referral import service
from shared.events import Envelope
from shared.kafka import DeadLetter
from shared.settings import Settings
from shared.streams import StreamProcessor, envelope_topic, make_faust_app
from shared.topics import Topic, Topics

log = logging.getLogger("clms.referral.worker")


def build_worker(settings: Settings, deps: service.Deps,
                 on_dead_letter: Callable[[DeadLetter], None] | None = None) -> faust.App:
    app = make_faust_app(settings, service.SERVICE)
    topics = Topics(settings.topic_prefix)
    proc = StreamProcessor(app=app, topics=topics, group=settings.group_id(service.SERVICE),
                           on_dead_letter=on_dead_letter)

    async def handle(envelope: Envelope) -> None:
        opened = await service.apply_case_event(deps, envelope=envelope)
        if opened:
            log.info("opened %d referrals for case %s (event %s)", len(opened), envelope.subject,
                     envelope.id)

    @app.agent(envelope_topic(app, topics, Topic.case_events), concurrency=1,
               name="referral.route-case-events")
    async def route_case_events(stream):  # noqa: ANN001 - faust stream
        await proc.run(stream, handle)

    return app


async def deadline_loop(deps: service.Deps, *, interval_s: float) -> None:
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
