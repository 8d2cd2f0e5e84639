"""Operator tools over the topics themselves: dead letters, consumer lag, and a case's story.

Everything here reads the broker with group-less consumers (nothing is committed, no consumer
group is disturbed). Values are never printed: a dead letter shows its origin and reason, a
trace shows event types, sources and times, so nothing personal reaches a terminal.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import asyncpg
import orjson
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from shared.db import migrate
from shared.events import EnvelopeError, parse_envelope
from shared.kafka import (SHORT_FETCH_WAIT_MS, DeadLetter, PartitionLag, group_lag, make_admin, make_consumer,
                          make_producer, read_topic, stop_quietly, topic_partitions)
from shared.settings import Settings
from shared.topics import Topic, Topics, consumed_by

MIGRATIONS = Path(__file__).with_name("migrations")
REPLAY_HEADER = "dlq_replay_of"


# --- dead letters ------------------------------------------------------------------------------


@dataclass
class StoredDeadLetter:
    dlq_partition: int
    dlq_offset: int
    timestamp_ms: int
    letter: DeadLetter
    event_id: str | None  # when the original value was a decodable envelope

    @property
    def id(self) -> str:
        return f"{self.dlq_partition}:{self.dlq_offset}"


def _event_id(value: bytes | None) -> str | None:
    if not value:
        return None
    try:
        return str(orjson.loads(value).get("id"))
    except (orjson.JSONDecodeError, AttributeError):
        return None


async def dead_letters(settings: Settings) -> list[StoredDeadLetter]:
    topics = Topics(settings.topic_prefix)
    out = []
    for r in await read_topic(settings, topics.dead_letters):
        letter = DeadLetter.from_headers(r.headers or (), key=r.key, value=r.value)
        out.append(StoredDeadLetter(r.partition, r.offset, r.timestamp, letter, _event_id(r.value)))
    return sorted(out, key=lambda d: d.timestamp_ms)


@dataclass
class ReasonSummary:
    reason: str
    count: int = 0
    oldest_ms: int | None = None
    topics: set[str] = field(default_factory=set)


def summarise(letters: Iterable[StoredDeadLetter]) -> list[ReasonSummary]:
    by_reason: dict[str, ReasonSummary] = {}
    for d in letters:
        s = by_reason.setdefault(d.letter.reason or "unknown", ReasonSummary(d.letter.reason or "unknown"))
        s.count += 1
        s.oldest_ms = d.timestamp_ms if s.oldest_ms is None else min(s.oldest_ms, d.timestamp_ms)
        s.topics.add(d.letter.topic)
    return sorted(by_reason.values(), key=lambda s: -s.count)


async def _replay_log(settings: Settings) -> asyncpg.Connection:
    conn = await asyncpg.connect(settings.require_database())
    await migrate(conn, schema="ops", folder=MIGRATIONS)
    return conn


@dataclass
class ReplayResult:
    replayed: list[str]
    skipped_already_replayed: list[str]
    not_found: list[str]
    # dead letters whose headers could not be verified, with why (nothing was published for them)
    refused: list[tuple[str, str]] = field(default_factory=list)
    operator: str = ""


def operator_identity(settings: Settings) -> str:
    """Who replays, from the credentials this command runs with, never from a flag: the Kafka
    principal (SASL user) where the broker authenticates clients, else the OS account."""
    import getpass

    if settings.kafka_sasl_username:
        return f"kafka:{settings.kafka_sasl_username}"
    return f"os:{getpass.getuser()}"


def consumer_groups(settings: Settings, topic: Topic) -> set[str]:
    """The consumer groups that really read `topic` (the registry's consumers, as deployed)."""
    from shared.topics import SPECS

    names = {settings.analytics_app_id if c == "analytics" else c for c in SPECS[topic].consumers}
    return {settings.group_id(n) for n in names}


async def read_record(settings: Settings, topic: str, partition: int, offset: int) -> ConsumerRecord | None:
    """The record at topic/partition/offset, or None when the broker no longer (or never) had it."""
    consumer = make_consumer(settings, group=None, fetch_max_wait_ms=SHORT_FETCH_WAIT_MS)
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        if tp not in await topic_partitions(consumer, topic):
            return None
        consumer.assign([tp])
        first = (await consumer.beginning_offsets([tp]))[tp]
        end = (await consumer.end_offsets([tp]))[tp]
        if not first <= offset < end:
            return None
        consumer.seek(tp, offset)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for msg in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []):
                if msg.offset == offset:
                    return msg
                if msg.offset > offset:
                    return None  # compacted away
        return None
    finally:
        await stop_quietly(consumer)


def _jws_payload(raw: bytes | None) -> dict | None:
    """The CloudEvent inside an inbound JWS (or a plain JSON event), read WITHOUT verifying the
    signature: only for naming (source, id, type, time). Intake verifies."""
    import base64
    import binascii

    if not raw:
        return None
    text = raw.strip()
    try:
        if text.startswith(b"{"):
            doc = orjson.loads(text)
        else:
            parts = text.split(b".")
            if len(parts) != 3:
                return None
            doc = orjson.loads(base64.urlsafe_b64decode(parts[1] + b"=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _check_inbound(fixed: bytes, original: bytes | None) -> None:
    from shared.events import IDENTIFICATION_SUBMITTED

    if fixed.strip().startswith(b"{"):
        raise ValueError("the fixed inbound identification must be signed by the agency office that sent the "
                         "original (a JWS, as agency systems publish it): an operator cannot vouch for an "
                         "agency's identification; ask the agency system to re-send it")
    doc = _jws_payload(fixed)
    if doc is None or doc.get("type") != IDENTIFICATION_SUBMITTED:
        raise ValueError(f"the fixed inbound event must be a JWS of a CloudEvent of type {IDENTIFICATION_SUBMITTED}")
    claimed = (_jws_payload(original) or {}).get("source")
    if claimed is not None and doc.get("source") != claimed:
        raise ValueError(f"the fixed inbound event claims source {doc.get('source')!r}, the original "
                         f"{claimed!r}: a correction comes from the same office")


async def _verify(settings: Settings, d: StoredDeadLetter, *, fixed: bool) -> tuple[bytes | None, str | None]:
    """(the bytes to re-publish, None) when the dead letter's headers check out, else (None, why).

    The headers are only claims (anyone who may write the dead-letter topic can write any): the
    original topic must be a registry topic read by the named consumer group, and the original
    record must still be where the headers point, with the same bytes (an inbound identification
    is not copied to the dead-letter topic: its original is re-published from the inbound topic,
    signed by its agency as it came)."""
    topics = Topics(settings.topic_prefix)
    logical = topics.logical(d.letter.topic) if d.letter.topic else None
    if logical is None or logical is Topic.dead_letters:
        return None, f"original topic {d.letter.topic!r} is not a topic of this deployment"
    if d.letter.group not in consumer_groups(settings, logical):
        return None, (f"consumer group {d.letter.group!r} does not read {d.letter.topic} (readers: "
                      f"{', '.join(sorted(consumer_groups(settings, logical)))})")
    original = await read_record(settings, d.letter.topic, d.letter.partition, d.letter.offset)
    if original is None:
        return None, (f"the original is no longer at {d.letter.topic}[{d.letter.partition}]@{d.letter.offset} "
                      "(retention), so the dead letter cannot be verified")
    if original.key != d.letter.key:
        return None, "the dead letter's key differs from the original's"
    if logical is Topic.agency_inbound:
        return original.value, None
    if not fixed and original.value != d.letter.value:
        return None, "the dead letter's value differs from the original's"
    return original.value, None


async def replay_dead_letters(
    settings: Settings, *, reason: str | None = None, ids: Iterable[str] = (),
    fixed_value: bytes | None = None, force: bool = False,
) -> ReplayResult:
    """Re-publish dead letters to their original topic (the verified original's key and value, or
    `fixed_value` for a single corrected event), recording each replay and who did it (from the
    credentials) so it is not repeated by accident. Select by `reason`, or by `ids`
    (`partition:offset` on the dead-letter topic, or the original event id)."""
    wanted = set(ids)
    topics = Topics(settings.topic_prefix)
    letters = await dead_letters(settings)
    if fixed_value is not None:
        if len(wanted) != 1:
            raise ValueError("a fixed event replaces exactly one dead letter: give one --id")
        target = next((d for d in letters if d.id in wanted or d.event_id in wanted), None)
        if target is not None and target.letter.topic == topics.agency_inbound:
            original = await read_record(settings, target.letter.topic, target.letter.partition,
                                         target.letter.offset)
            _check_inbound(fixed_value, original.value if original else None)  # intake verifies the signature
        else:
            try:
                parse_envelope(fixed_value)
            except EnvelopeError as exc:
                raise ValueError(f"the fixed event is not a valid envelope: {exc.reason}") from exc
    chosen = [
        d for d in letters
        if (not wanted or d.id in wanted or (d.event_id and d.event_id in wanted))
        and (reason is None or d.letter.reason == reason)
    ]
    found = {d.id for d in chosen} | {d.event_id for d in chosen if d.event_id}
    operator = operator_identity(settings)
    result = ReplayResult([], [], sorted(w for w in wanted if w not in found), operator=operator)
    if not chosen:
        return result
    conn = await _replay_log(settings)
    producer = make_producer(settings)
    await producer.start()
    try:
        for d in chosen:
            done = await conn.fetchval(
                "select 1 from ops.dlq_replays where dlq_topic=$1 and dlq_partition=$2 and dlq_offset=$3",
                topics.dead_letters, d.dlq_partition, d.dlq_offset,
            )
            if done and not force:
                result.skipped_already_replayed.append(d.id)
                continue
            value, why = await _verify(settings, d, fixed=fixed_value is not None)
            if why is not None:
                result.refused.append((d.id, why))
                continue
            value = fixed_value if fixed_value is not None else value
            await producer.send_and_wait(
                d.letter.topic, value, key=d.letter.key,
                headers=[(REPLAY_HEADER, d.id.encode()), ("dlq_replayed_by", operator.encode())],
            )
            await conn.execute(
                "insert into ops.dlq_replays(dlq_topic, dlq_partition, dlq_offset, original_topic, reason, "
                "fixed, replayed_by) values($1,$2,$3,$4,$5,$6,$7)",
                topics.dead_letters, d.dlq_partition, d.dlq_offset, d.letter.topic, d.letter.reason,
                fixed_value is not None, operator,
            )
            result.replayed.append(d.id)
    finally:
        await producer.stop()
        await conn.close()
    return result


# --- lag ---------------------------------------------------------------------------------------


async def consumer_lag(settings: Settings, groups: Iterable[str] = ()) -> list[PartitionLag]:
    """Lag per partition for the given consumer groups, or every group of this deployment."""
    wanted = set(groups)
    if not wanted:
        admin = make_admin(settings)
        await admin.start()
        try:
            listed = [g[0] if isinstance(g, tuple) else g for g in await admin.list_consumer_groups()]
        finally:
            await admin.close()
        wanted = {g for g in listed if g.startswith(settings.topic_prefix)}
        # the services' own groups always, also when one has not committed yet (a group whose
        # only member died before its first commit is gone from the broker's list)
        wanted |= {settings.group_id(g) for g in consumed_by()}
    return await group_lag(settings, wanted)


# --- trace -------------------------------------------------------------------------------------


@dataclass
class TraceLine:
    time: datetime
    topic: str
    partition: int
    offset: int
    type: str
    source: str
    event_id: str
    correlation_id: str
    causation_id: str | None
    replayed: bool


async def trace_case(settings: Settings, case_id: uuid.UUID | str) -> list[TraceLine]:
    """Every event about one case on every event topic, in time order, starting with the agency
    submission on clms.agency-inbound when the case came from one."""
    topics = Topics(settings.topic_prefix)
    key = str(case_id).encode()
    lines: list[TraceLine] = []
    for logical in (Topic.case_events, Topic.referral_events, Topic.notification_events):
        name = topics.name(logical)
        for r in await read_topic(settings, name):
            if r.key != key:
                continue
            try:
                env = parse_envelope(r.value)
            except EnvelopeError:
                continue
            lines.append(TraceLine(
                time=env.time, topic=name, partition=r.partition, offset=r.offset, type=env.type,
                source=env.source, event_id=str(env.id), correlation_id=env.correlationid,
                causation_id=env.causationid,
                replayed=any(h[0] == REPLAY_HEADER for h in (r.headers or ())),
            ))
    causes = {ln.causation_id for ln in lines if ln.type == "case.identified" and ln.causation_id}
    if causes:
        lines += await _inbound_submissions(settings, causes)
    # the first copy of an event id is the story; later copies are at-least-once duplicates
    seen: set[str] = set()
    story = []
    for line in sorted(lines, key=lambda x: (x.time, x.topic, x.offset)):
        if line.event_id in seen:
            continue
        seen.add(line.event_id)
        story.append(line)
    return story


async def _inbound_submissions(settings: Settings, event_ids: set[str]) -> list[TraceLine]:
    """The agency submissions on clms.agency-inbound that cases began with (a case.identified
    names one as its cause). Only the envelope's id, type, source and time are read: the rest
    carries identity (encrypted) and the signature is intake's to check. Skipped where this
    operator may not read the inbound topic (ACLs)."""
    from aiokafka.errors import KafkaError

    topic = Topics(settings.topic_prefix).agency_inbound
    try:
        records = await read_topic(settings, topic)
    except KafkaError:
        return []
    found = []
    for r in records:
        doc = _jws_payload(r.value)
        if doc is None or str(doc.get("id")) not in event_ids:
            continue
        try:
            when = datetime.fromisoformat(str(doc.get("time")))
            when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
        except ValueError:
            when = datetime.fromtimestamp(r.timestamp / 1000, tz=timezone.utc)
        found.append(TraceLine(
            time=when, topic=topic, partition=r.partition, offset=r.offset, type=str(doc.get("type", "")),
            source=str(doc.get("source", "")), event_id=str(doc["id"]),
            correlation_id=str(doc.get("correlationid") or ""), causation_id=None,
            replayed=any(h[0] == REPLAY_HEADER for h in (r.headers or ())),
        ))
    return found
