"""Kafka plumbing on aiokafka: client factories that work on Tansu and on Apache Kafka, and
dead-lettering.

The same settings drive aiokafka here and faust in `shared.streams`, so security settings
(SASL, TLS) reach every client.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient

from shared.redact import redact_contacts
from shared import tansu
from shared.events import Envelope
from shared.settings import Settings
from shared.topics import Topics, consumed_by, declare_topics


def connection_kwargs(settings: Settings) -> dict[str, Any]:
    """Bootstrap and security arguments shared by every aiokafka client."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.require_kafka(),
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_sasl_mechanism:
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kwargs["sasl_plain_username"] = settings.kafka_sasl_username
        kwargs["sasl_plain_password"] = (
            settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None
        )
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = ssl.create_default_context(cafile=settings.kafka_ssl_cafile)
    return kwargs


def make_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """A producer that waits for all in-sync replicas; idempotent (no duplicate from a retried
    send) except on Tansu, which rejects it (shared/tansu.py)."""
    kwargs: dict[str, Any] = {
        **connection_kwargs(settings),
        "acks": "all",
        "enable_idempotence": settings.kafka_enable_idempotence,
        "linger_ms": 2,
        "max_batch_size": 65536,
        "request_timeout_ms": 15000,
    }
    kwargs.update(overrides)
    return AIOKafkaProducer(**kwargs)


# aiokafka's fetcher loop wakes on every fetch answer, seek, resume, consumed batch and
# assignment change, and in any case after `consumer_timeout_ms` (200 ms by default: 5 wake-ups a
# second per consumer with nothing to do, a quarter of an idle faust worker's CPU). Each of those
# events completes a future the loop waits on, so the timeout is only a safety net: 1 s.
FETCHER_TIMEOUT_MS = 1000

# The broker answers one request per connection at a time, and a consumer's end-offset, seek and
# fetch requests share a connection: behind a fetch waiting at the end of a topic they wait as
# well, up to the long poll (KAFKA_FETCH_MAX_WAIT_MS, 5 s on Apache Kafka). So a consumer that
# reads a topic to its end and stops (tools, scans, tests), and a faust worker while it
# rebalances or recovers its tables (`shared.streams.tune_fetch_wait`), poll this briefly.
SHORT_FETCH_WAIT_MS = 100


def make_consumer(settings: Settings, *topics: str, group: str | None, **overrides: Any) -> AIOKafkaConsumer:
    """A consumer that commits only what was processed (auto-commit off)."""
    kwargs: dict[str, Any] = {
        **connection_kwargs(settings),
        "group_id": settings.group_id(group) if group else None,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": settings.kafka_fetch_max_wait_ms,
        "consumer_timeout_ms": FETCHER_TIMEOUT_MS,
        "rebalance_timeout_ms": int(settings.kafka_rebalance_timeout_s * 1000),
        "session_timeout_ms": int(settings.kafka_session_timeout_s * 1000),
        "heartbeat_interval_ms": max(100, int(settings.kafka_session_timeout_s * 1000 / 10)),
    }
    kwargs.update(overrides)
    return AIOKafkaConsumer(*topics, **kwargs)


def make_admin(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**connection_kwargs(settings), request_timeout_ms=15000)


async def ensure_topics(settings: Settings) -> list[str]:
    """Declare every registry topic (idempotent); return those created."""
    admin = make_admin(settings)
    await admin.start()
    try:
        return await declare_topics(admin, Topics(settings.topic_prefix))
    finally:
        await admin.close()


async def send_envelope(producer: AIOKafkaProducer, topic: str, envelope: Envelope) -> None:
    """Send one envelope keyed by its subject (the case id) and wait for the broker's ack."""
    await producer.send_and_wait(
        topic, envelope.to_json_bytes(), key=envelope.key, headers=envelope.headers()
    )


async def stop_quietly(client: AIOKafkaConsumer) -> None:
    """Stop a consumer; aiokafka 0.14 can raise CancelledError from a group-less consumer's
    coordinator when it is stopped right after start."""
    with contextlib.suppress(asyncio.CancelledError):
        await client.stop()


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """The partitions of `topic`, in order; [] when the broker does not know the topic.

    A consumer learns the topics when it starts; for one declared since, its metadata is
    refreshed once. aiokafka has no public call for that refresh, so this is the one place
    that reaches into the client for it."""
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(topic) or set()
    return [TopicPartition(topic, p) for p in sorted(parts)]


async def read_topic(settings: Settings, topic: str, *, min_count: int = 0, idle_s: float = 0.0,
                     timeout_s: float = 60.0) -> list[ConsumerRecord]:
    """Every record on `topic` from its beginning, read with a group-less consumer (nothing
    committed, no group disturbed), at least up to the end offsets at the time of the call.

    `min_count`: wait for at least that many records (TimeoutError after `timeout_s`, naming
    the topic and the count). `idle_s`: then read on until no record came for that long."""
    consumer = make_consumer(settings, group=None, fetch_max_wait_ms=SHORT_FETCH_WAIT_MS)
    await consumer.start()
    try:
        tps = await topic_partitions(consumer, topic)
        consumer.assign(tps)
        if tps:
            await consumer.seek_to_beginning(*tps)
        return await _read_assigned(consumer, tps, topic, min_count=min_count, idle_s=idle_s,
                                    timeout_s=timeout_s)
    finally:
        await stop_quietly(consumer)


async def _read_assigned(consumer: AIOKafkaConsumer, tps: list[TopicPartition], topic: str, *,
                         min_count: int, idle_s: float, timeout_s: float) -> list[ConsumerRecord]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    ends = await consumer.end_offsets(tps) if tps else {}
    records: list[ConsumerRecord] = []
    last_new = loop.time()
    while tps and loop.time() < deadline:
        caught_up = all([await consumer.position(tp) >= ends[tp] for tp in tps])
        if caught_up and len(records) >= min_count and loop.time() - last_new >= idle_s:
            return records
        if caught_up:  # more are awaited: the end offsets move as they arrive
            ends = await consumer.end_offsets(tps)
        for msgs in (await consumer.getmany(*tps, timeout_ms=100)).values():
            records.extend(msgs)
            last_new = loop.time() if msgs else last_new
    if len(records) < min_count:
        raise TimeoutError(f"expected at least {min_count} records on {topic} within {timeout_s:.0f}s, "
                           f"got {len(records)}" + ("" if tps else " (the broker does not know the topic)"))
    return records


async def broker_ready(producer: AIOKafkaProducer | None, timeout_s: float = 2.0) -> str | None:
    """Readiness check: None when the broker answers a metadata request, else why not."""
    if producer is None:
        return "not started"
    try:
        await asyncio.wait_for(producer.client.fetch_all_metadata(), timeout_s)
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return f"broker unreachable ({type(exc).__name__})"
    return None


# --- consumer lag -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int | None  # None: the group has committed nothing on this partition yet
    end: int
    lag: int  # see partition_lag


def partition_lag(settings: Settings, *, end: int, committed: int | None) -> int:
    """Messages a group has not consumed: the log end offset minus its committed offset (from 0
    when it has committed nothing on the partition). Exact on Apache Kafka.

    The one Tansu workaround for lag lives here: Tansu 0.6.0 can report a log end offset below a
    committed offset after multi-record batches ("committed 6, end 5"), so with
    CLMS_BROKER_KIND=tansu a negative lag is shown as 0."""
    return tansu.clamp_lag(settings, end, committed)


async def group_lag(settings: Settings, groups: list[str] | set[str]) -> list[PartitionLag]:
    """Committed offset vs end offset on every registry topic for the given consumer groups
    (full group ids). Committed offsets are fetched by a member that never joins (OffsetFetch
    through the coordinator): the admin client's call for it does not decode on Tansu 0.6.0."""
    topics = Topics(settings.topic_prefix)
    known = {settings.group_id(g): {topics.name(t) for t in ts} for g, ts in consumed_by().items()}
    reader = make_consumer(settings, group=None)
    await reader.start()
    try:
        tps = [tp for name in topics.all() for tp in await topic_partitions(reader, name)]
        ends = await reader.end_offsets(tps)
    finally:
        await stop_quietly(reader)
    rows: list[PartitionLag] = []
    for group in sorted(groups):
        member = make_consumer(settings, group=None, group_id=group)
        await member.start()
        try:
            found = [(tp, await member.committed(tp)) for tp in tps]
        finally:
            await stop_quietly(member)
        # a topic the group consumes: one the registry says it reads, or one where it committed
        # somewhere; its partitions without a commit yet count from offset 0
        consumed = {tp.topic for tp, c in found if c is not None} | known.get(group, set())
        rows += [PartitionLag(group, tp.topic, tp.partition, committed, ends[tp],
                              partition_lag(settings, end=ends[tp], committed=committed))
                 for tp, committed in found if tp.topic in consumed]
    return rows


# --- dead letters ------------------------------------------------------------------------------

DLQ_HEADER_TOPIC = "dlq_original_topic"
DLQ_HEADER_PARTITION = "dlq_original_partition"
DLQ_HEADER_OFFSET = "dlq_original_offset"
DLQ_HEADER_GROUP = "dlq_consumer_group"
DLQ_HEADER_REASON = "dlq_reason"
DLQ_HEADER_ERROR = "dlq_error"
DLQ_HEADER_TIME = "dlq_time_ms"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Where a message came from and why it could not be processed."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str  # short machine-readable class: invalid_json, invalid_envelope, unknown_type, handler_error, ...
    error: str  # a sentence naming the field or the exception; never message content
    group: str = ""

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            (DLQ_HEADER_TOPIC, self.topic.encode()),
            (DLQ_HEADER_PARTITION, str(self.partition).encode()),
            (DLQ_HEADER_OFFSET, str(self.offset).encode()),
            (DLQ_HEADER_GROUP, self.group.encode()),
            (DLQ_HEADER_REASON, self.reason.encode()),
            # error texts of libraries may quote an officer's e-mail or a phone number
            (DLQ_HEADER_ERROR, redact_contacts(self.error)[:1000].encode()),
            (DLQ_HEADER_TIME, str(int(time.time() * 1000)).encode()),
        ]

    @classmethod
    def from_headers(cls, headers: list[tuple[str, bytes]] | tuple, *, key: bytes | None,
                     value: bytes | None) -> "DeadLetter":
        h = {k: (v or b"").decode() for k, v in headers}
        return cls(
            topic=h.get(DLQ_HEADER_TOPIC, ""),
            partition=int(h.get(DLQ_HEADER_PARTITION, "-1") or -1),
            offset=int(h.get(DLQ_HEADER_OFFSET, "-1") or -1),
            key=key,
            value=value,
            reason=h.get(DLQ_HEADER_REASON, ""),
            error=h.get(DLQ_HEADER_ERROR, ""),
            group=h.get(DLQ_HEADER_GROUP, ""),
        )


def classify_error(error: str) -> str:
    """Short reason class for an envelope error, for metrics and `clms dlq list`."""
    if error.startswith("invalid JSON"):
        return "invalid_json"
    if error.startswith("type: unknown event type"):
        return "unknown_type"
    return "invalid_envelope"


async def dead_letter(producer: AIOKafkaProducer, topics: Topics, letter: DeadLetter) -> None:
    """Publish the original bytes to clms.dead-letters with headers naming origin and error."""
    await producer.send_and_wait(
        topics.dead_letters, letter.value, key=letter.key, headers=letter.headers()
    )
    from shared.metrics import DEAD_LETTERS

    DEAD_LETTERS.labels(letter.group, letter.topic, letter.reason).inc()
