"""Metrics move when events flow (scrape before and after), on a real service (referral) with
the real broker and database; readiness names the broker and database."""

from __future__ import annotations

import re

import pytest

from services.referral.app import create_app
from shared.kafka import send_envelope, make_producer
from shared.topics import Topics
from tests import builders
from tests.apps import scrape, running
from tests.infra import wait_until

pytestmark = pytest.mark.integration


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_stream_metrics_move_when_events_flow(env):
    topics = Topics(env.topic_prefix)
    app = create_app(env)
    async with running(app) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert set(ready.json()["checks"]) >= {"database", "broker", "worker"}
        # the public API port has no /metrics: exact counts are for the monitoring port only
        assert (await client.get("/metrics")).status_code == 404
        before = await scrape(app)
        case = builders.case_identified(municipality="prizren")
        producer = make_producer(env)
        await producer.start()
        try:
            await send_envelope(producer, topics.case_events, builders.envelope(case))
        finally:
            await producer.stop()

        # the counters live in one process-wide registry and the produced one is labelled with the
        # logical topic (the same in every test): what counts is how much they moved in this test
        def produced(text: str) -> float:
            return metric(text, "clms_events_produced_total", schema="referral", topic="clms.referral-events",
                          type="referral.created")

        def consumed(text: str) -> float:
            return metric(text, "clms_events_consumed_total", topic=topics.case_events, type="case.identified",
                          outcome="applied")

        async def moved():
            text = await scrape(app)
            # one case in Prizren: referrals to the Centre for Social Work and the education directorate
            return text if consumed(text) - consumed(before) >= 1 and produced(text) - produced(before) >= 2 else None
        after = await wait_until(moved, timeout_s=30, what="consumed and produced counters to move")
        assert metric(after, "clms_events_consumed_total", topic=topics.case_events) > \
            metric(before, "clms_events_consumed_total", topic=topics.case_events)
        assert metric(after, "clms_event_processing_seconds_count", topic=topics.case_events) > \
            metric(before, "clms_event_processing_seconds_count", topic=topics.case_events)
        assert re.search(r'clms_outbox_backlog_rows\{schema="referral"\}', after)

        async def lag_sampled():  # committed offsets exist once faust commits; sampled every 5 s
            text = await scrape(app)
            lines = [ln for ln in text.splitlines()
                     if ln.startswith("clms_consumer_lag{") and env.group_id("referral") in ln
                     and topics.case_events in ln]
            return lines if len(lines) == 6 and all(ln.endswith(" 0.0") for ln in lines) else None
        await wait_until(lag_sampled, timeout_s=30, what="lag per partition of case-events, caught up")
