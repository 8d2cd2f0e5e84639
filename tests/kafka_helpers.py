"""Reading and writing topics in tests with plain aiokafka clients (no group, no commits)."""

from __future__ import annotations

from aiokafka.structs import ConsumerRecord

from shared.kafka import group_lag, make_producer, read_topic
from shared.settings import Settings


async def read_all(settings: Settings, topic: str, *, min_count: int = 0, timeout_s: float = 15.0,
                   idle_s: float = 0.5) -> list[ConsumerRecord]:
    """Every record on `topic` from the beginning (`shared.kafka.read_topic`); waits for at least
    `min_count` of them, then until the topic has been idle for `idle_s`."""
    try:
        return await read_topic(settings, topic, min_count=min_count, idle_s=idle_s, timeout_s=timeout_s)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


async def produce(settings: Settings, topic: str, items: list[tuple[bytes | None, bytes]],
                  headers: list | None = None) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for key, value in items:
            await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()


async def consumed_to_the_end(settings: Settings, topic: str, *services: str) -> bool:
    """True when the consumer group of each service (`analytics` is its faust app id) has
    committed up to the end of every partition of `topic`: every record on it is applied, so
    nothing can still change what the service shows. Wait on this, not on a fixed sleep, before
    asserting that something was not done twice."""
    groups = {settings.group_id(settings.analytics_app_id if s == "analytics" else s) for s in services}
    rows = [r for r in await group_lag(settings, groups) if r.topic == topic]
    return {r.group for r in rows} == groups and all(r.lag == 0 for r in rows)
