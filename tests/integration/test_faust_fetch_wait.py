"""A faust worker long-polls KAFKA_FETCH_MAX_WAIT_MS (5 s on Apache Kafka: an idle worker then
asks the broker every 5 s, and the broker still answers as soon as data arrives) only once it has
settled. While it rebalances or recovers its tables it polls briefly: its offset requests (table
recovery's highwaters, the seeks of `fix_rebalance_seek`) share the connection with its fetches,
and the broker answers one request per connection at a time. With the long poll throughout, an
analytics worker took 73 s instead of 14 to recover its share of a 1,000,000-event rebuild
(bench/README.md).

The wait is checked on the fetcher of a real worker (aiokafka's own, in faust's consumer
thread), so the test also fails when a new aiokafka or faust no longer calls what
`shared.streams.tune_fetch_wait` wraps."""

from __future__ import annotations

import uuid

import pytest

from shared.kafka import SHORT_FETCH_WAIT_MS
from shared.streams import envelope_topic, make_faust_app
from shared.topics import Topic, Topics
from tests.apps import faust_running
from tests.infra import wait_until

pytestmark = pytest.mark.integration


async def test_a_worker_polls_long_once_settled_and_briefly_while_it_rebalances(env):
    settings = env.model_copy(update={"kafka_fetch_max_wait_ms_override": 5000})
    app = make_faust_app(settings, f"wait-{uuid.uuid4().hex[:6]}")

    @app.agent(envelope_topic(app, Topics(env.topic_prefix), Topic.case_events), concurrency=1)
    async def drain(stream):  # noqa: ANN001 - faust stream
        async for _ in stream.events():
            pass

    async with faust_running(app):
        await wait_until(lambda: bool(app.consumer.assignment()) and not app.rebalancing and not app.in_recovery,
                         timeout_s=60, what="the worker to be assigned its partitions and settle")
        fetcher = app.consumer._thread._consumer._fetcher
        assignment = fetcher._subscriptions.subscription.assignment

        def wait_of_next_fetch() -> int:
            fetcher._get_actions_per_node(assignment)  # what the fetcher calls to build a request
            return fetcher._fetch_max_wait_ms

        assert wait_of_next_fetch() == 5000
        app.rebalancing = True
        try:
            assert wait_of_next_fetch() == SHORT_FETCH_WAIT_MS
        finally:
            app.rebalancing = False
        app.in_recovery = True
        try:
            assert wait_of_next_fetch() == SHORT_FETCH_WAIT_MS
        finally:
            app.in_recovery = False
        assert wait_of_next_fetch() == 5000
