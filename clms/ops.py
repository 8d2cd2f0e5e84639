"""Operator tools over the topics themselves: dead letters, consumer lag, and a case's story.

Everything here reads the broker with group-less consumers (nothing is committed, no consumer
group is disturbed). Values are never printed: a dead letter shows its origin and reason, a
trace shows event types, sources and times, so nothing personal reaches a terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from shared.kafka import DeadLetter, PartitionLag, group_lag, make_admin, make_consumer, make_producer
from shared.settings import Settings
from shared.topics import Topic, Topics, consumed_by

MIGRATIONS = Path(__file__).with_name("migrations")
REPLAY_HEADER = "dlq_replay_of"


async def read_topic(settings: Settings, topic: str) -> list[ConsumerRecord]:
    """Every record on `topic` up to its end offsets at the time of the call."""
    consumer = make_consumer(settings, group=None)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return []
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        pending = {tp for tp in tps if ends[tp] > 0}
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + 60
        while pending and time.monotonic() < deadline:
            batch = await consumer.getmany(*pending, timeout_ms=200)
            for tp, msgs in batch.items():
                records.extend(m for m in msgs if m.offset < ends[tp])
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        return records
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await consumer.stop()


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
    needs_fixed: list[str] = field(default_factory=list)


def _check_inbound(raw: bytes) -> None:
    from shared.events import IDENTIFICATION_SUBMITTED

    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"the fixed inbound event is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("type") != IDENTIFICATION_SUBMITTED:
        raise ValueError(f"the fixed inbound event must be a CloudEvent of type {IDENTIFICATION_SUBMITTED}")


async def replay_dead_letters(
    settings: Settings, *, reason: str | None = None, ids: Iterable[str] = (),
    fixed_value: bytes | None = None, operator: str = "cli", force: bool = False,
) -> ReplayResult:
    """Re-publish dead letters to their original topic (key and value as they were, or
    `fixed_value` for a single corrected event), recording each replay so it is not repeated
    by accident. Select by `reason`, or by `ids` (`partition:offset` on the dead-letter topic,
    or the original event id)."""
    wanted = set(ids)
    topics = Topics(settings.topic_prefix)
    letters = await dead_letters(settings)
    if fixed_value is not None:
        if len(wanted) != 1:
            raise ValueError("a fixed event replaces exactly one dead letter: give one --id")
        target = next((d for d in letters if d.id in wanted or d.event_id in wanted), None)
        if target is not None and target.letter.topic == topics.agency_inbound:
            _check_inbound(fixed_value)  # intake validates the rest, exactly as on first arrival
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
    result = ReplayResult([], [], sorted(w for w in wanted if w not in found))
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
            if not d.letter.topic:
                result.not_found.append(d.id)
                continue
            if fixed_value is None and d.letter.topic == topics.agency_inbound:
                # intake does not copy inbound identities onto the dead-letter topic: the original
                # stays on the inbound topic (headers say where); replay a corrected copy with --fixed
                result.needs_fixed.append(d.id)
                continue
            value = fixed_value if fixed_value is not None else d.letter.value
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
    carries identity. Skipped where this operator may not read the inbound topic (ACLs)."""
    from aiokafka.errors import KafkaError

    topic = Topics(settings.topic_prefix).agency_inbound
    try:
        records = await read_topic(settings, topic)
    except KafkaError:
        return []
    found = []
    for r in records:
        try:
            doc = orjson.loads(r.value or b"null")
        except orjson.JSONDecodeError:
            continue
        if not isinstance(doc, dict) or str(doc.get("id")) not in event_ids:
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
