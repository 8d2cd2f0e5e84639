"""faust-streaming plumbing: the app factory, an envelope codec, and the one agent loop every
stream processor uses (decode -> handle -> dead-letter on a permanent error -> move on).

Rules learned the hard way (README, "faust-streaming rules"): agents run with concurrency=1,
`processing_guarantee="at_least_once"`, no pickle, `web_tables_enabled=False`.

Acks. faust acks an event in a `finally` of its stream iterator (and `take_events()` acks every
buffered event in a `finally`), so an event whose handler raised or was cancelled (a worker
stopped during a rolling deploy, in the middle of a database retry or of a batch) is acked and
then committed although it was never applied. The loops here therefore turn faust's automatic
acks off (`unacked_events`, `Stream.noack_take`) and ack an event themselves once it has been
applied or dead-lettered; anything else stays unacked, the committed offset stops before it, and
the next owner of the partition gets it again (consumers are idempotent on the event id).

A dead letter that cannot be sent (broker away) is retried with backoff until it is sent: the
partition waits, the worker stays up and reports itself not ready (`StreamProcessor.blocked`,
metric `clms_stream_blocked`), and the event is acked only after its dead letter is on the topic.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import faust
from faust.serializers.schemas import Schema

from shared.events import Envelope, EnvelopeError, parse_envelope
from shared.kafka import FETCHER_TIMEOUT_MS, SHORT_FETCH_WAIT_MS, DeadLetter, classify_error
from shared.logs import bound_to_envelope
from shared.metrics import CONSUMED, DEAD_LETTER_SEND_FAILURES, DEAD_LETTERS, PROCESSING, STREAM_BLOCKED
from shared.settings import Settings
from shared.topics import Topic, Topics

log = logging.getLogger("clms.streams")

_fetch_wait_patched: int | None = None


def tune_fetch_wait(ms: int) -> None:
    """Make faust's worker consumer honour KAFKA_FETCH_MAX_WAIT_MS once it has settled, poll
    briefly while it rebalances or recovers its tables, and wake its fetcher only when
    something happens (`shared.kafka.FETCHER_TIMEOUT_MS`).

    faust hard-codes fetch_max_wait_ms=1500 in its aiokafka driver. On a broker that does not
    wake a waiting fetch (Tansu 0.6.0) every hop then costs up to 1.5 s; on Apache Kafka the
    setting keeps Kafka's usual meaning. During a rebalance and the table recovery after it,
    faust asks for offsets (its recovery's highwaters, our seeks to the beginning) on the
    fetch connection, where each would wait behind a long poll: there the wait is
    `shared.kafka.SHORT_FETCH_WAIT_MS` (an analytics worker recovering its share of a
    1,000,000-event rebuild took 73 s at a constant 5 s wait, 22 s at 500 ms). Process-wide,
    idempotent.
    """
    global _fetch_wait_patched
    import faust.transport.drivers.aiokafka as driver

    if _fetch_wait_patched is None:
        original = driver.AIOKafkaConsumerThread._create_worker_consumer

        def _create_worker_consumer(self: Any, transport: Any) -> Any:
            consumer = original(self, transport)
            consumer._fetch_max_wait_ms = _fetch_wait_patched
            consumer._consumer_timeout = FETCHER_TIMEOUT_MS / 1000  # read when it starts its fetcher
            _short_wait_until_settled(consumer, self.app)
            return consumer

        driver.AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer
    _fetch_wait_patched = ms


def _short_wait_until_settled(consumer: Any, app: Any) -> None:
    """Once the consumer has started its fetcher, make each fetch request it builds wait the
    long poll only while `app` neither rebalances nor recovers tables."""
    start = consumer.start

    async def start_then_adapt() -> None:
        await start()
        fetcher = consumer._fetcher
        long_ms = fetcher._fetch_max_wait_ms
        short_ms = min(long_ms, SHORT_FETCH_WAIT_MS)
        actions = fetcher._get_actions_per_node  # builds the fetch requests, reading the wait

        def actions_with_wait(assignment: Any) -> Any:
            settled = not (app.rebalancing or app.in_recovery)
            fetcher._fetch_max_wait_ms = long_ms if settled else short_ms
            return actions(assignment)

        fetcher._get_actions_per_node = actions_with_wait

    consumer.start = start_then_adapt


_rebalance_fixed = False


def fix_rebalance_seek() -> None:
    """faust 0.15 consumer defects that lose or reorder events across a rebalance, fixed in
    `Consumer.getmany` and `Consumer.perform_seek`; patched process-wide, idempotent.
    tests/integration/test_faust_rebalance_seek.py shows 2 and 3 (it fails without them); 1 is
    what tests/integration/test_analytics_scale_out.py kept running into (figures in
    services/analytics/README.md).

    1. faust drops records aiokafka has already returned (and moved its fetch position past)
       when the flow stops or the generation changes while it hands them out, or when their
       partition is paused, and relies on seeking back to the committed offsets afterwards.
       That seek does not move a partition the group never committed (aiokafka's
       `seek_to_committed` skips offset None), nor a table's changelog partition being
       recovered: their dropped records were never read (the analytics scale-out test lost
       the events of exactly the never-committed partitions, and a worker's table recovery
       waited forever for changelog records it had dropped). Here every partition with records
       that were not handed out is sought back to the first of them.
    2. After a rebalance a partition the group never committed is sought to its beginning
       (what `auto_offset_reset=earliest` means for it), so that a record lost between the
       fetch and the stream is read again; consumers recognise what they already applied.
    3. After table recovery faust resumes the stream partitions *before* seeking them, so the
       fetcher could deliver records from the old position (past dropped ones) first: an
       acknowledgement before the referral it acknowledges; and records fetched after the seek
       but before the flow resumes were put into the streams' queues, which resuming the flow
       empties (one identification lost in a scale-out run). The seek holds the stream
       partitions back (out of the consumer's active set) until the flow has resumed.
    """
    global _rebalance_fixed
    if _rebalance_fixed:
        return
    from aiokafka import TopicPartition
    from aiokafka.errors import IllegalStateError
    from faust.transport.consumer import Consumer, ensure_TP

    async def getmany(self: Any, timeout: float) -> Any:
        records, active_partitions = await self._wait_next_records(timeout)
        generation_id = self.app.consumer_generation_id
        if records is None or self.should_stop:
            return
        undelivered: dict[Any, int] = {}  # partition -> offset of its first record not handed out
        for tp, record in self.scheduler.iterate(records):
            if tp in undelivered:
                continue
            if (not self.flow_active or self.app.consumer_generation_id != generation_id
                    or not (active_partitions is None or tp in active_partitions
                            or tp in self._buffered_partitions)):
                undelivered[tp] = record.offset
                continue
            self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
            yield tp, self._to_message(tp, record)
        for tp, offset in undelivered.items():
            try:
                await self._thread.seek_wait({tp: offset})  # fetched again when its partition is read next
            except IllegalStateError:  # no longer assigned: its next owner reads it
                pass

    def release_held(self: Any) -> None:
        held: set = getattr(self, "_clms_held", set())
        if held:
            self._clms_held = set()
            assigned = {ensure_TP(tp) for tp in self.assignment()}
            self._get_active_partitions().update(held & (assigned - self._paused_partitions))

    original_resume_flow = Consumer.resume_flow

    def resume_flow(self: Any) -> None:
        original_resume_flow(self)  # faust resumes its streams' queues (emptying them) just before
        release_held(self)

    original_perform_seek = Consumer.perform_seek

    async def perform_seek(self: Any) -> None:
        active = self._get_active_partitions()
        held = {tp for tp in active if not self._is_changelog_tp(tp)}
        active.difference_update(held)
        self._clms_held = getattr(self, "_clms_held", set()) | held  # fetched again once the flow resumes
        try:
            await original_perform_seek(self)  # to the committed offsets, where the group has one
            never = [TopicPartition(tp.topic, tp.partition) for tp in self.assignment()
                     if self._committed_offset.get(tp) is None and self.app.topics.acks_enabled_for(tp.topic)]
            if never:
                try:
                    await self._thread.seek_to_beginning(*never)
                except IllegalStateError:  # a new rebalance took one away: it seeks again
                    log.info("a partition was revoked while seeking it; the next rebalance seeks again")
        except BaseException:
            release_held(self)
            raise

    Consumer.getmany = getmany
    Consumer.perform_seek = perform_seek
    Consumer.resume_flow = resume_flow
    _rebalance_fixed = True


def broker_credentials(settings: Settings) -> faust.SASLCredentials | faust.SSLCredentials | None:
    """The same SASL/TLS settings aiokafka clients get, in faust's terms."""
    ctx = None
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        ctx = ssl.create_default_context(cafile=settings.kafka_ssl_cafile)
    if settings.kafka_sasl_mechanism:
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None,
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=ctx,
        )
    if ctx is not None:
        return faust.SSLCredentials(ctx)
    return None


def make_faust_app(settings: Settings, name: str, *, store: str = "memory://", **overrides: Any) -> faust.App:
    """A faust App for one service. `name` becomes the consumer group (with the topic prefix)."""
    tune_fetch_wait(settings.kafka_fetch_max_wait_ms)
    fix_rebalance_seek()
    servers = settings.require_kafka().split(",")
    datadir = settings.data_dir / "faust"
    datadir.mkdir(parents=True, exist_ok=True)
    conf: dict[str, Any] = dict(
        broker=";".join(f"kafka://{s.strip()}" for s in servers),
        broker_credentials=broker_credentials(settings),
        store=store,
        topic_partitions=6,
        topic_allow_declare=True,
        processing_guarantee="at_least_once",
        web_enabled=False,
        web_tables_enabled=False,
        consumer_auto_offset_reset="earliest",
        broker_rebalance_timeout=settings.kafka_rebalance_timeout_s,
        broker_session_timeout=settings.kafka_session_timeout_s,
        broker_heartbeat_interval=max(0.1, settings.kafka_session_timeout_s / 10),
        producer_acks=-1,
        # 5 ms to gather what the agents send (table changelogs, dead letters) into fewer produce
        # requests than faust's default 0 (a request per record). Measured: no change in the
        # analytics worker's CPU at 100 identifications/s (bench/README.md); kept, as it adds
        # nothing to the alert path, which publishes through the outbox relays.
        producer_linger=0.005,
        key_serializer="raw",
        value_serializer="raw",
        table_cleanup_interval=30.0,
        # every 0.5 s instead of faust's 2.8 s: after a crash a partition is read again from
        # at most half a second back (fewer redelivered events to recognise). It was first a
        # mitigation of the lost never-committed partitions that `fix_rebalance_seek` fixes.
        broker_commit_interval=0.5,
        stream_wait_empty=False,
        # faust makes a folder per app even with the memory store; keep it in the data dir
        # (default `.clms/`, ignored by git), not in the working directory
        datadir=str(datadir / "{conf.name}-data"),
    )
    conf.update(overrides)
    return faust.App(settings.group_id(name), **conf)


# --- codec -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A message that is not a valid envelope; the agent dead-letters it with `error`."""

    raw: bytes | None
    reason: str
    error: str


class EnvelopeSchema(Schema):
    """Decodes message values into `Envelope` with pydantic; never raises on bad input."""

    def __init__(self) -> None:
        super().__init__(key_serializer="raw", value_serializer="raw")

    def loads_value(self, app: Any, message: Any, *, loads: Any = None, serializer: Any = None) -> Any:
        raw = message.value
        try:
            return parse_envelope(raw if raw is not None else b"null")
        except EnvelopeError as exc:
            return Undecodable(raw=raw, reason=classify_error(exc.reason), error=exc.reason)

    def loads_key(self, app: Any, message: Any, *, loads: Any = None, serializer: Any = None) -> Any:
        return message.key


def envelope_topic(app: faust.App, topics: Topics, topic: Topic) -> faust.TopicT:
    return app.topic(topics.name(topic), schema=EnvelopeSchema(), partitions=6)


def raw_topic(app: faust.App, topics: Topics, topic: Topic) -> faust.TopicT:
    return app.topic(topics.name(topic), key_serializer="raw", value_serializer="raw", partitions=6)


# --- the agent loop ----------------------------------------------------------------------------


def is_transient(exc: BaseException) -> bool:
    """Errors that a retry fixes (database or broker briefly away, a conflict between
    transactions) as opposed to a bad event, which is dead-lettered."""
    import asyncpg

    from shared.db import DATABASE_UNAVAILABLE

    retry_fixes = (asyncpg.exceptions.SerializationError, asyncpg.exceptions.DeadlockDetectedError)
    return isinstance(exc, DATABASE_UNAVAILABLE + retry_fixes)


Handler = Callable[[Envelope], Awaitable[None]]


async def unacked_events(stream: Any) -> Any:
    """`stream.events()` without faust's automatic ack.

    faust acks the current event in a `finally` when the loop body asks for the next one, and
    also when the body raised or was cancelled. Here nothing is acked: the caller acks with
    `await stream.ack(event)` once the event was applied or dead-lettered.
    """
    stream.enable_acks = False
    async for event in stream.events():
        yield event


async def noack_batches(stream: Any, max_: int, *, within: float) -> Any:
    """Batches of up to `max_` events, unacked: faust's `Stream.noack_take`, except that an empty
    buffer waits for its first event without a timer. `noack_take` wakes every `within` seconds
    whether or not anything arrived (100 times a second for 10 ms, most of an idle worker's CPU);
    here a quiet stream costs nothing, and once an event is in, the batch is handed over when
    `max_` events are in or `within` seconds have passed, as before. The caller acks each event
    (`await stream.ack(event)`) once it was applied or dead-lettered."""
    buffer: list[Any] = []
    nonempty, full, consumed = asyncio.Event(), asyncio.Event(), asyncio.Event()
    consuming: asyncio.Future | None = None

    async def add_to_buffer(value: Any) -> Any:
        nonlocal consuming
        if consuming is not None:  # the caller is working on the last batch: wait for it
            try:
                await consuming
            finally:
                consuming = None
        event = stream.current_event
        if event is None:
            raise RuntimeError("the take buffer found no current event")
        buffer.append(event)
        nonempty.set()
        if len(buffer) >= max_:
            full.set()
            consumed.clear()
            await stream.wait(consumed)  # never more than max_ in a batch
        return value

    enable_acks, stream.enable_acks = stream.enable_acks, False
    stream.add_processor(add_to_buffer)
    stream._enable_passive(aiter(stream.channel))
    try:
        while not stream.should_stop:
            if not buffer:
                await stream.wait_for_stopped(nonempty)
                continue
            await stream.wait_for_stopped(full, timeout=within)
            consuming = stream.loop.create_future()
            try:
                yield list(buffer)
            finally:
                buffer.clear()
                nonempty.clear()
                full.clear()
                if not consuming.done():
                    consuming.set_result(None)
                consumed.set()
    finally:
        stream.enable_acks = enable_acks
        stream._processors.remove(add_to_buffer)


class StreamProcessor:
    """Runs `handler` for each event of a faust stream with the system's failure policy:

    - undecodable message -> dead letter with the field-naming reason, move on;
    - transient error (database down) -> retry with backoff until it works (the partition
      waits rather than losing the event);
    - any other exception -> dead letter with reason `handler_error`, move on;
    - a dead letter that cannot be sent -> retried with backoff until it is sent (the partition
      waits; `blocked` says why, for readiness);
    - an event is acked only after it was applied or dead-lettered (`run`; batch loops call
      `process` and ack themselves).
    """

    def __init__(self, *, app: faust.App, topics: Topics, group: str,
                 on_dead_letter: Callable[[DeadLetter], None] | None = None,
                 max_backoff_s: float = 5.0):
        self.topics = topics
        self.group = group
        self.dlq = raw_topic(app, topics, Topic.dead_letters)
        self.on_dead_letter = on_dead_letter
        self.max_backoff_s = max_backoff_s
        self.blocked: str | None = None  # why the partition waits (None: it does not)

    async def dead_letter(self, letter: DeadLetter) -> None:
        """Send `letter` to clms.dead-letters; returns only once the broker took it.

        While the send fails the partition waits (the caller has not acked the event), the
        failure is counted and `blocked` names it; cancellation (the worker stopping) leaves
        the event unacked, so it comes again after a restart."""
        backoff = 0.1
        failures = 0
        try:
            while True:
                try:
                    await self._send_dead_letter(letter)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - broker away: the partition waits
                    failures += 1
                    DEAD_LETTER_SEND_FAILURES.labels(self.group).inc()
                    STREAM_BLOCKED.labels(self.group).set(1)
                    self.blocked = (f"cannot send a dead letter for {letter.topic}[{letter.partition}]@"
                                    f"{letter.offset} ({type(exc).__name__}: {str(exc)[:200]}); the partition "
                                    f"waits and the send is retried (attempt {failures}); check the broker")
                    log.warning("dead letter for %s[%d]@%d not sent (%s), retrying in %.1fs",
                                letter.topic, letter.partition, letter.offset, type(exc).__name__, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(self.max_backoff_s, backoff * 2)
        finally:
            if failures:
                self.blocked = None
                STREAM_BLOCKED.labels(self.group).set(0)
        log.warning(
            "dead-lettered message from %s[%d]@%d: %s",
            letter.topic, letter.partition, letter.offset, letter.reason,
        )
        DEAD_LETTERS.labels(self.group, letter.topic, letter.reason).inc()
        if self.on_dead_letter:
            try:
                self.on_dead_letter(letter)
            except Exception:  # noqa: BLE001 - a metrics callback must not undo the dead letter
                log.exception("on_dead_letter callback failed")

    async def _send_dead_letter(self, letter: DeadLetter) -> None:
        fut = await self.dlq.send(key=letter.key, value=letter.value or b"", headers=letter.headers())
        await fut

    async def run(self, stream: Any, handler: Handler) -> None:
        async for event in unacked_events(stream):
            await self.process(event, handler)
            await stream.ack(event)  # applied or dead-lettered: only now

    async def process(self, event: Any, handler: Handler) -> None:
        msg = event.message
        value = event.value

        def letter(reason: str, error: str) -> DeadLetter:
            raw = value.raw if isinstance(value, Undecodable) else msg.value
            return DeadLetter(topic=msg.topic, partition=msg.partition, offset=msg.offset,
                              key=msg.key, value=raw, reason=reason, error=error, group=self.group)

        if isinstance(value, Undecodable):
            await self.dead_letter(letter(value.reason, value.error))
            CONSUMED.labels(self.group, msg.topic, "undecodable", "dead_lettered").inc()
            return
        started = time.perf_counter()
        with bound_to_envelope(value):
            outcome = await self._handle(value, handler, letter)
        CONSUMED.labels(self.group, msg.topic, value.type, outcome).inc()
        PROCESSING.labels(self.group, msg.topic, value.type).observe(time.perf_counter() - started)

    async def _handle(self, value: Envelope, handler: Handler, letter: Callable[[str, str], DeadLetter]) -> str:
        backoff = 0.1
        retried = False
        while True:
            try:
                await handler(value)
                return "retried" if retried else "applied"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the policy is the point of this loop
                if is_transient(exc):
                    log.warning("transient error handling %s %s, retrying in %.1fs: %s",
                                value.type, value.id, backoff, type(exc).__name__)
                    await asyncio.sleep(backoff)
                    backoff = min(self.max_backoff_s, backoff * 2)
                    retried = True
                    continue
                log.exception("handler failed for %s %s; dead-lettering", value.type, value.id)
                await self.dead_letter(letter("handler_error", f"{type(exc).__name__}: {exc}"[:1000]))
                return "dead_lettered"
