"""Fast rebuild of the analytics tables for a new deployment, outside faust.

Reading a million events through a faust agent costs ~1 ms each (faust's per-event machinery,
not the counting), i.e. ~20 minutes. This tool does the same fold with plain aiokafka clients
and the same pure functions (`counting.apply_event`), then hands the result to faust in faust's
own terms:

1. read `clms.case-events`, `clms.referral-events`, `clms.notification-events` from the
   beginning up to their end offsets at start (a snapshot), folding each event into the state of
   its case (per source partition, as the agent would); undecodable messages are dead-lettered
   with the same headers as the agent's;
2. write one record per case to the table's changelog topic
   (`<app id>-analytics-cases-changelog`, partition = the case's source partition, declared
   compacted with 6 partitions), each partition closed by a single-record batch (a tombstone for
   a key that never exists; see the Tansu note in the code);
3. commit the snapshot's end offsets for the new app id's consumer group.

Then `ANALYTICS_APP_ID=<that id> python -m services.analytics` recovers the table from the
changelog and continues from the committed offsets; events that arrive meanwhile are simply read
by the agent (and a re-read event is recognised by the case's seen-set).

    ANALYTICS_APP_ID=analytics-v2 python -m services.analytics.rebuild

Refuses to run for an app id that already has committed offsets (that deployment exists).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass

from aiokafka import TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from services.analytics.counting import CaseState, apply_event
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


async def rebuild(settings: Settings, *, app_id: str | None = None) -> RebuildResult:
    app_id = app_id or settings.analytics_app_id
    topics = Topics(settings.topic_prefix)
    group = settings.group_id(app_id)
    t0 = time.perf_counter()
    names = [topics.name(t) for t in SOURCE_TOPICS]
    tps = [TopicPartition(n, p) for n in names for p in range(PARTITIONS)]

    committer = make_consumer(settings, group=app_id)
    await committer.start()
    try:
        committer.assign(tps)
        existing = {tp: await committer.committed(tp) for tp in tps}
        if any(o is not None for o in existing.values()):
            raise SystemExit(f"consumer group {group!r} already has committed offsets: that deployment "
                             "exists. Choose a new ANALYTICS_APP_ID to rebuild.")

        reader = make_consumer(settings, group=None, max_partition_fetch_bytes=4 * 1024 * 1024,
                               fetch_max_wait_ms=50)
        await reader.start()
        producer = make_producer(settings, linger_ms=20)
        await producer.start()
        states: list[dict[bytes, CaseState]] = [{} for _ in range(PARTITIONS)]
        events = applied = dead = 0
        done: dict[TopicPartition, int] = {}  # next offset after the last folded record
        try:
            reader.assign(tps)
            end = await reader.end_offsets(tps)
            pending = {tp for tp in tps if end[tp] > 0}
            await reader.seek_to_beginning(*tps)
            while pending:
                batch = await reader.getmany(*pending, timeout_ms=200, max_records=5000)
                for tp, records in batch.items():
                    table = states[tp.partition]
                    for r in records:
                        if r.offset >= end[tp]:
                            break
                        done[tp] = r.offset + 1
                        events += 1
                        try:
                            envelope = parse_envelope(r.value if r.value is not None else b"null")
                        except EnvelopeError as exc:
                            dead += 1
                            await dead_letter(producer, topics, DeadLetter(
                                topic=tp.topic, partition=tp.partition, offset=r.offset, key=r.key,
                                value=r.value, reason=classify_error(exc.reason), error=exc.reason, group=group))
                            continue
                        key = envelope.key
                        old = table.get(key) or CaseState()
                        new, was_applied = apply_event(old, envelope)
                        if was_applied:
                            applied += 1
                            table[key] = new
                    if await reader.position(tp) >= end[tp]:
                        pending.discard(tp)

            log.info("rebuild: folded %d events in %.1fs", events, time.perf_counter() - t0)
            await declare_changelog(settings, app_id)
            futures = []
            cl = changelog_topic(settings, app_id)
            cases = sum(len(t) for t in states)
            for partition, table in enumerate(states):
                while table:  # written states are dropped, and at most 5,000 sends are in flight:
                    key, state = table.popitem()  # peak memory is the fold's, not fold + changelog
                    futures.append(await producer.send(cl, state.to_bytes(), key=key, partition=partition))
                    if len(futures) >= 5000:
                        await asyncio.gather(*futures)
                        futures.clear()
            await asyncio.gather(*futures)
            # Tansu 0.6.0 answers ListOffsets(latest) with the last *batch*'s base offset + 1, and
            # faust's recovery stops at that "highwater", dropping the rest of the last batch. So
            # each partition ends with a batch of one record: a tombstone for a key that never
            # exists, harmless to the table on any broker.
            for partition in range(PARTITIONS):
                await producer.send_and_wait(cl, None, key=END_MARKER, partition=partition)
        finally:
            await producer.stop()
            await reader.stop()
        # commit what was folded (not the end offsets, which Tansu may under-report): the agent
        # continues from there, and any overlap is recognised by the cases' seen-sets
        if done:
            await committer.commit(done)
    finally:
        await committer.stop()
    result = RebuildResult(app_id=app_id, events=events, applied=applied, dead_lettered=dead,
                           cases=cases, seconds=time.perf_counter() - t0)
    log.info("analytics rebuild done for %s: %d events, %d cases, %d dead-lettered, %.1fs",
             result.app_id, result.events, result.cases, result.dead_lettered, result.seconds)
    return result


def main() -> None:
    from shared.logs import configure_logging

    settings = Settings()
    configure_logging("analytics", level=settings.log_level, json=settings.log_json)
    result = asyncio.run(rebuild(settings, app_id=sys.argv[1] if len(sys.argv) > 1 else None))
    print(f"rebuilt {result.cases} cases from {result.events} events ({result.dead_lettered} dead-lettered) "
          f"in {result.seconds:.1f}s for app id {result.app_id!r}; now start the service with "
          f"ANALYTICS_APP_ID={result.app_id}")


if __name__ == "__main__":
    main()
