"""Intake's consumer: one plain aiokafka consumer (group `<prefix>intake`, manual commits) on

- `clms.agency-inbound`: `identification.submitted` CloudEvents from agency systems, validated
  and turned into cases through the same `service.identify` as the HTTP path (inbox dedupe on
  source + id in the same transaction);
- `clms.referral-events`: `referral.created` tells which agency offices hold a referral for a
  case (and so may read it).

Why aiokafka and not faust here: the inbound type is an ingress type outside the case-event
registry (faust's `EnvelopeSchema` would dead-letter it as unknown), no table or windowing is
needed, and a plain consumer commits exactly what the database committed (offset + 1 after the
transaction) and starts in well under a second instead of faust's ~5 s.

Failure policy (the same as `shared.streams.StreamProcessor`): invalid input -> clms.dead-letters
with reason and original topic/partition/offset, then move on; transient errors (database away)
-> retry the same message with backoff, the partition waits; anything else -> dead letter
`handler_error`. Offsets are committed only after the message's effect (or its dead letter).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord, TopicPartition

from shared.events import EnvelopeError, parse_envelope
from shared.metrics import CONSUMED, PROCESSING
from shared.kafka import DeadLetter, classify_error, dead_letter, make_consumer, make_producer
from shared.settings import Settings
from shared.streams import is_transient
from shared.topics import Topics
from services.intake import service
from services.intake.deps import Deps

log = logging.getLogger("clms.intake.worker")

GROUP = "intake"
REDACTED = (b'{"redacted":"an inbound identification carries personal data; read the original from '
            b'dlq_original_topic at dlq_original_partition/dlq_original_offset"}')


class IntakeConsumer:
    def __init__(self, *, deps: Deps, settings: Settings, metrics: Any | None = None,
                 max_backoff_s: float = 5.0):
        self.deps = deps
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.metrics = metrics
        self.max_backoff_s = max_backoff_s
        self.running = False
        self.processed = 0
        self.group = settings.group_id(GROUP)

    async def run(self) -> None:
        backoff = 0.2
        while True:
            consumer = make_consumer(self.settings, self.topics.agency_inbound, self.topics.referral_events,
                                     group=GROUP)
            producer = make_producer(self.settings)
            try:
                await consumer.start()
                await producer.start()
                self.running = True
                backoff = 0.2
                while True:
                    batch = await consumer.getmany(timeout_ms=500, max_records=200)
                    for tp, records in batch.items():
                        await self.handle_records(records, producer)
                        await consumer.commit({TopicPartition(tp.topic, tp.partition): records[-1].offset + 1})
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - broker away: reconnect; uncommitted messages come again
                log.warning("intake consumer restarting after %s: %s (in %.1fs)", type(exc).__name__, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(self.max_backoff_s, backoff * 2)
            finally:
                self.running = False
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await consumer.stop()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await producer.stop()

    async def handle_records(self, records: list[ConsumerRecord], producer: AIOKafkaProducer) -> None:
        """One partition's records in order. A run of well-formed referral events is applied in
        one transaction (one commit for many, not one each); if that transaction fails, the run
        goes again one record at a time through `handle`, with its retry and dead-letter policy.
        Anything else (inbound identifications, a malformed event) goes through `handle`."""
        parsed = [(record, self._referral_envelope(record)) for record in records]
        for is_referral_run, group in itertools.groupby(parsed, key=lambda pair: pair[1] is not None):
            run = list(group)
            if not is_referral_run or not await self._apply_run(run):
                for record, _ in run:
                    await self._handle_counted(record, producer)

    async def _apply_run(self, run: list[tuple[ConsumerRecord, Any]]) -> bool:
        """The kept events of a run of referral events in one transaction; False if it failed."""
        started = time.perf_counter()
        kept = [envelope for _, envelope in run if envelope.type in service.REFERRAL_EVENTS_KEPT]
        try:
            if kept:
                await service.apply_referral_events(self.deps, envelopes=kept)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the caller goes one at a time, with the policy
            log.info("a batch of %d referral events failed (%s); applying them one at a time",
                     len(run), type(exc).__name__)
            return False
        each = (time.perf_counter() - started) / len(run)
        for record, _ in run:
            self._count(record, each)
        return True

    def _referral_envelope(self, record: ConsumerRecord) -> Any:
        """The envelope of a well-formed referral event, else None (`handle` deals with it)."""
        if record.topic != self.topics.referral_events or record.value is None:
            return None
        try:
            return parse_envelope(record.value)
        except EnvelopeError:
            return None

    async def _handle_counted(self, record: ConsumerRecord, producer: AIOKafkaProducer) -> None:
        started = time.perf_counter()
        await self.handle(record, producer)
        self._count(record, time.perf_counter() - started)

    def _count(self, record: ConsumerRecord, seconds: float) -> None:
        self.processed += 1
        etype = dict(record.headers or ()).get("ce_type", b"") or b"unknown"
        etype = etype.decode(errors="replace")[:64]
        CONSUMED.labels(self.group, record.topic, etype, "handled").inc()
        PROCESSING.labels(self.group, record.topic, etype).observe(seconds)

    async def handle(self, record: ConsumerRecord, producer: AIOKafkaProducer) -> None:
        def letter(reason: str, error: str) -> DeadLetter:
            # An inbound identification carries identity: its bytes are NOT copied onto the
            # dead-letter topic; the headers point at the original (topic/partition/offset), which
            # stays on the access-restricted, short-retention inbound topic.
            inbound = record.topic == self.topics.agency_inbound
            return DeadLetter(topic=record.topic, partition=record.partition, offset=record.offset,
                              key=record.key, value=REDACTED if inbound else record.value,
                              reason=reason, error=error[:1000], group=self.settings.group_id(GROUP))

        backoff = 0.1
        while True:
            try:
                if record.topic == self.topics.agency_inbound:
                    result = await service.submit_inbound(self.deps, raw=record.value)
                    if self.metrics:
                        self.metrics.identifications.labels("inbound", "replayed" if result.replayed else "created").inc()
                else:
                    try:
                        envelope = parse_envelope(record.value if record.value is not None else b"null")
                    except EnvelopeError as exc:
                        raise service.InboundRejected(classify_error(exc.reason), exc.reason) from None
                    if envelope.type in service.REFERRAL_EVENTS_KEPT:
                        await service.apply_referral_event(self.deps, envelope=envelope)
                return
            except asyncio.CancelledError:
                raise
            except service.InboundRejected as exc:
                await self._dead_letter(producer, letter(exc.reason, exc.error))
                return
            except Exception as exc:  # noqa: BLE001 - the policy is the point of this loop
                if is_transient(exc):
                    log.warning("transient error on %s[%d]@%d, retrying in %.1fs: %s", record.topic,
                                record.partition, record.offset, backoff, type(exc).__name__)
                    await asyncio.sleep(backoff)
                    backoff = min(self.max_backoff_s, backoff * 2)
                    continue
                log.exception("handler failed on %s[%d]@%d; dead-lettering", record.topic, record.partition,
                              record.offset)
                await self._dead_letter(producer, letter("handler_error", f"{type(exc).__name__}: {exc}"))
                return

    async def _dead_letter(self, producer: AIOKafkaProducer, letter: DeadLetter) -> None:
        await dead_letter(producer, self.topics, letter)
        log.warning("dead-lettered %s[%d]@%d: %s", letter.topic, letter.partition, letter.offset, letter.reason)
        if self.metrics:
            self.metrics.dead_letters.labels(letter.reason).inc()
