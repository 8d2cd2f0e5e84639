"""Fast rebuild of the analytics tables for a new deployment, outside faust.

Reading a million events through a faust agent costs ~1 ms each (faust's per-event machinery,
not the counting), i.e. ~20 minutes. This tool does the same fold with plain aiokafka clients
and the same pure functions (`rules.apply_event`), then hands the result to faust in faust's
own terms:

1. one partition number at a time (a case's events on the three topics and its changelog record
   share one partition number), read partition p of `clms.case-events`, `clms.referral-events`,
   `clms.notification-events` from the beginning up to their end offsets at start (a snapshot),
   folding each event into the state of its case, kept as its changelog bytes; undecodable
   messages are dead-lettered with the same headers as the agent's;
2. write one record per case of that partition to partition p of the table's changelog topic
   (`<app id>-analytics-cases-changelog`, declared compacted with 6 partitions), closed by a
   single-record batch (a tombstone for a key that never exists; see the Tansu note in the
   code), and forget those cases before the next partition: the tool holds a sixth of the cases;
3. commit the folded offsets for the new app id's consumer group.

Then `ANALYTICS_APP_ID=<that id> python -m services.analytics` recovers the table from the
changelog and continues from the committed offsets; events that arrive meanwhile are simply read
by the agent (and a re-read event is recognised by the case's seen-set).

    ANALYTICS_APP_ID=analytics-v2 python -m services.analytics.rebuild
    ANALYTICS_APP_ID=analytics-v2 python -m services.analytics.rebuild --partitions 0,1,2  # a share

Refuses to run for an app id that already has committed offsets (that deployment exists).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from services.analytics.rules import CaseState, apply_event
from services.analytics.tables import CASES_TABLE
from services.analytics.worker import SOURCE_TOPICS
from shared.events import EnvelopeError, parse_envelope
from shared.kafka import DeadLetter, classify_error, dead_letter, make_admin, make_consumer, make_producer
from shared.settings import Settings
from shared.topics import PARTITIONS, Topics

log = logging.getLogger("clms.analytics.rebuild")


END_MARKER = b"__analytics_rebuild_end__"


@dataclass(frozen=True)
class RebuildResult:
    app_id: str
    events: int
    applied: int
    dead_lettered: int
    cases: int
    seconds: float


async def declare_changelog(settings: Settings, app_id: str) -> None:
    """Create the cases table's changelog (compacted, co-partitioned with the source topics)
    before faust starts, as the production topic-init job does: faust checks the partition
    count against its metadata, which must already hold the topic."""
    admin = make_admin(settings)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(changelog_topic(settings, app_id), PARTITIONS, 1,
                                            topic_configs={"cleanup.policy": "compact"})])
    except TopicAlreadyExistsError:
        pass
    finally:
        await admin.close()


def changelog_topic(settings: Settings, app_id: str) -> str:
    # faust names a table's changelog "<app id>-<table name>-changelog"
    return f"{settings.group_id(app_id)}-{CASES_TABLE}-changelog"


@dataclass
class _Tally:
    events: int = 0
    applied: int = 0
    dead: int = 0
    cases: int = 0


@dataclass(frozen=True)
class _Run:
    """What every step of one rebuild shares."""

    settings: Settings
    topics: Topics
    group: str
    changelog: str
    reader: AIOKafkaConsumer
    producer: AIOKafkaProducer


async def rebuild(settings: Settings, *, app_id: str | None = None,
                  partitions: Iterable[int] | None = None) -> RebuildResult:
    """Fold and write one source partition at a time (a case's events and its changelog record
    all live in one partition number), so the tool holds one sixth of the cases at a time.
    `partitions` (default: all) lets several operators or pods share a rebuild."""
    app_id = app_id or settings.analytics_app_id
    parts = sorted(set(range(PARTITIONS) if partitions is None else partitions))
    topics = Topics(settings.topic_prefix)
    group = settings.group_id(app_id)
    t0 = time.perf_counter()
    names = [topics.name(t) for t in SOURCE_TOPICS]
    committer = make_consumer(settings, group=app_id)
    await committer.start()
    try:
        await _refuse_existing(committer, [TopicPartition(n, p) for n in names for p in parts], group)
        await declare_changelog(settings, app_id)
        reader = make_consumer(settings, group=None, max_partition_fetch_bytes=4 * 1024 * 1024,
                               fetch_max_wait_ms=50)
        await reader.start()
        producer = make_producer(settings, linger_ms=20)
        await producer.start()
        run = _Run(settings=settings, topics=topics, group=group, reader=reader, producer=producer,
                   changelog=changelog_topic(settings, app_id))
        tally = _Tally()
        done: dict[TopicPartition, int] = {}  # next offset after the last folded record
        try:
            for partition in parts:
                table = await _fold_partition(run, [TopicPartition(n, partition) for n in names], tally, done)
                tally.cases += len(table)
                await _write_changelog(run, partition, table)
        finally:
            await producer.stop()
            await reader.stop()
        # commit what was folded (not the end offsets, which Tansu may under-report): the agent
        # continues from there, and any overlap is recognised by the cases' seen-sets
        if done:
            await committer.commit(done)
    finally:
        await committer.stop()
    result = RebuildResult(app_id=app_id, events=tally.events, applied=tally.applied,
                           dead_lettered=tally.dead, cases=tally.cases, seconds=time.perf_counter() - t0)
    log.info("analytics rebuild done for %s: %d events, %d cases, %d dead-lettered, %.1fs",
             result.app_id, result.events, result.cases, result.dead_lettered, result.seconds)
    return result


async def _refuse_existing(committer: AIOKafkaConsumer, tps: list[TopicPartition], group: str) -> None:
    committer.assign(tps)
    existing = {tp: await committer.committed(tp) for tp in tps}
    if any(o is not None for o in existing.values()):
        raise SystemExit(f"consumer group {group!r} already has committed offsets: that deployment "
                         "exists. Choose a new ANALYTICS_APP_ID to rebuild.")


async def _fold_partition(run: _Run, tps: list[TopicPartition], tally: _Tally,
                          done: dict[TopicPartition, int]) -> dict[bytes, bytes]:
    """The case states of one partition number, folded from its three source partitions up to
    their end offsets at start; each state kept as its changelog bytes (a third of the objects'
    memory)."""
    reader = run.reader
    reader.assign(tps)
    end = await reader.end_offsets(tps)
    pending = {tp for tp in tps if end[tp] > 0}
    await reader.seek_to_beginning(*tps)
    table: dict[bytes, bytes] = {}
    while pending:
        batch = await reader.getmany(*pending, timeout_ms=200, max_records=5000)
        for tp, records in batch.items():
            for r in records:
                if r.offset >= end[tp]:
                    break
                done[tp] = r.offset + 1
                tally.events += 1
                await _fold_record(run, tp, r, table, tally)
            if await reader.position(tp) >= end[tp]:
                pending.discard(tp)
    return table


async def _fold_record(run: _Run, tp: TopicPartition, r: ConsumerRecord, table: dict[bytes, bytes],
                       tally: _Tally) -> None:
    try:
        envelope = parse_envelope(r.value if r.value is not None else b"null")
    except EnvelopeError as exc:
        tally.dead += 1
        await dead_letter(run.producer, run.topics, DeadLetter(
            topic=tp.topic, partition=tp.partition, offset=r.offset, key=r.key, value=r.value,
            reason=classify_error(exc.reason), error=exc.reason, group=run.group))
        return
    key = envelope.key
    new, was_applied = apply_event(CaseState.from_bytes(table.get(key)), envelope)
    if was_applied:
        tally.applied += 1
        table[key] = new.to_bytes()


async def _write_changelog(run: _Run, partition: int, table: dict[bytes, bytes]) -> None:
    """One record per case in `partition` of the changelog, at most 5,000 sends in flight, each
    state dropped once sent."""
    futures = []
    while table:
        key, value = table.popitem()
        futures.append(await run.producer.send(run.changelog, value, key=key, partition=partition))
        if len(futures) >= 5000:
            await asyncio.gather(*futures)
            futures.clear()
    await asyncio.gather(*futures)
    # Tansu 0.6.0 answers ListOffsets(latest) with the last *batch*'s base offset + 1, and faust's
    # recovery stops at that "highwater", dropping the rest of the last batch. So the partition
    # ends with a batch of one record: a tombstone for a key that never exists, harmless to the
    # table on any broker.
    await run.producer.send_and_wait(run.changelog, None, key=END_MARKER, partition=partition)


def _partition_list(text: str) -> list[int]:
    try:
        parts = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of partition numbers; write e.g. 0,1,2") from None
    if not parts or any(not 0 <= p < PARTITIONS for p in parts):
        raise argparse.ArgumentTypeError(f"partitions are numbers from 0 to {PARTITIONS - 1}; got {text!r}")
    return parts


def main() -> None:
    from shared.logs import configure_logging

    settings = Settings()
    configure_logging("analytics", level=settings.log_level, json=settings.log_json)
    parser = argparse.ArgumentParser(prog="python -m services.analytics.rebuild",
                                     description="Rebuild the analytics table for a new app id.")
    parser.add_argument("app_id", nargs="?", help="default: ANALYTICS_APP_ID")
    parser.add_argument("--partitions", type=_partition_list, default=None,
                        help="comma-separated partition numbers, e.g. 0,1,2 (default: all)")
    args = parser.parse_args()
    result = asyncio.run(rebuild(settings, app_id=args.app_id, partitions=args.partitions))
    print(f"rebuilt {result.cases} cases from {result.events} events ({result.dead_lettered} dead-lettered) "
          f"in {result.seconds:.1f}s for app id {result.app_id!r}; now start the service with "
          f"ANALYTICS_APP_ID={result.app_id}")


if __name__ == "__main__":
    main()
