"""After a rebalance faust seeks every stream partition back to its committed offset, so that
records it fetched but dropped while the rebalance began are read again. A partition the
consumer group has never committed must go back to its beginning: aiokafka's
`seek_to_committed` leaves it where the fetcher was, and faust 0.15 then never read its dropped
records again (the analytics scale-out test lost exactly the events of never-committed
partitions). `shared.streams.fix_rebalance_seek` seeks such a partition to its beginning.

The drop is reproduced the way it happens, on the real broker: the flow stops (a rebalance
begins), records arrive, the fetch position moves past them (aiokafka returned them; faust
dropped them), faust resumes the partition and seeks as it does after a rebalance, and the flow
resumes; the partition must not be fetchable until the seek is done.
"""

from __future__ import annotations

import uuid

import pytest
from aiokafka import TopicPartition
from faust.types import TP

from shared.streams import envelope_topic, make_faust_app
from shared.topics import Topic, Topics
from tests import builders
from tests.apps import faust_running
from tests.infra import wait_until
from tests.kafka_helpers import produce

pytestmark = pytest.mark.integration


async def test_records_skipped_in_a_never_committed_partition_are_read_again_after_the_seek(env):
    topics = Topics(env.topic_prefix)
    key = b"one-case"
    first = [builders.envelope() for _ in range(3)]
    await produce(env, topics.case_events, [(key, e.to_json_bytes()) for e in first])

    # the group commits nothing while the test runs: the partition stays never-committed
    app = make_faust_app(env, f"seek-{uuid.uuid4().hex[:6]}", broker_commit_interval=3600.0)
    seen: list[uuid.UUID] = []
    where: list[TP] = []

    @app.agent(envelope_topic(app, topics, Topic.case_events), concurrency=1)
    async def collect(stream):  # noqa: ANN001 - faust stream
        async for event in stream.events():
            seen.append(event.value.id)
            where.append(TP(event.message.topic, event.message.partition))

    async with faust_running(app):
        await wait_until(lambda: {e.id for e in first} <= set(seen), timeout_s=60,
                         what="the agent to see the first three events")
        tp, consumer = where[0], app.consumer
        consumer.stop_flow()  # a rebalance begins
        skipped = [builders.envelope() for _ in range(2)]
        await produce(env, topics.case_events, [(key, e.to_json_bytes()) for e in skipped])
        await consumer.seek_wait({TopicPartition(*tp): len(first) + len(skipped)})  # fetched, then dropped by faust
        # after table recovery faust resumes the partitions, then seeks: nothing of them may be
        # fetched before the seek is done (it would come before the records it skipped)
        fetchable_while_seeking: list[bool] = []
        seek_to_committed = consumer.seek_to_committed

        async def watched_seek():
            fetchable_while_seeking.append(tp in consumer._get_active_partitions())
            return await seek_to_committed()

        consumer.seek_to_committed = watched_seek
        consumer.resume_partitions({tp})
        await consumer.perform_seek()  # what faust does after the rebalance
        consumer.resume_flow()
        assert fetchable_while_seeking == [False], "the partition was fetchable during the seek"
        assert tp in consumer._get_active_partitions(), "the partition is fetchable again after the seek"
        await wait_until(lambda: {e.id for e in skipped} <= set(seen), timeout_s=30,
                         what="the two events past the fetch position to be read again")
    assert seen.count(first[0].id) == 2, "the never-committed partition was read again from its beginning"
