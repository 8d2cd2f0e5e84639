"""Reading and writing topics in tests with plain aiokafka clients (no group, no commits)."""

from __future__ import annotations

from aiokafka.structs import ConsumerRecord

from shared.kafka import make_producer, read_topic
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
