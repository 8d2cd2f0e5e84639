"""Reading and writing topics in tests with plain aiokafka clients (no group, no commits)."""

from __future__ import annotations

import asyncio
import contextlib

from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.kafka import make_consumer, make_producer
from shared.settings import Settings


async def read_all(settings: Settings, topic: str, *, min_count: int = 0, timeout_s: float = 15.0,
                   idle_s: float = 0.5) -> list:
    """Every record on `topic` from the beginning; waits for at least `min_count` of them,
    then until the topic has been idle for `idle_s`."""
    consumer: AIOKafkaConsumer = make_consumer(settings, group=None)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        last_new = loop.time()
        while loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=100)
            n = sum(len(v) for v in batch.values())
            for msgs in batch.values():
                records.extend(msgs)
            if n:
                last_new = loop.time()
            elif len(records) >= min_count and loop.time() - last_new >= idle_s:
                break
        if len(records) < min_count:
            raise AssertionError(
                f"expected at least {min_count} records on {topic} within {timeout_s:.0f}s, got {len(records)}"
            )
        return records
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await consumer.stop()


async def produce(settings: Settings, topic: str, items: list[tuple[bytes | None, bytes]],
                  headers: list | None = None) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for key, value in items:
            await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()
