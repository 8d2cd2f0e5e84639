"""A poison event whose dead letter cannot be sent (the broker refuses the send three times) is
neither lost nor skipped: the partition waits, the worker says why it is not ready, the dead
letter is sent once the broker takes it, and only then is the next event of the partition
applied.

The failure is injected through the one seam every consumer shares: the faust topic object of
`clms.dead-letters` that `StreamProcessor` sends through (`shared.streams.raw_topic`). Its first
three sends raise `KafkaTimeoutError` (what aiokafka raises while the broker is away); the rest
go to the real broker.
"""

from __future__ import annotations

import contextlib
import uuid

import asyncpg
import pytest
from aiokafka.errors import KafkaTimeoutError

import shared.streams as streams
from services.referral.app import create_app
from shared.kafka import DeadLetter
from shared.streams import StreamProcessor, envelope_topic, make_faust_app
from shared.topics import Topic, Topics
from tests import builders
from tests.apps import faust_running, running
from tests.infra import wait_until
from tests.kafka_helpers import produce, read_all

pytestmark = pytest.mark.reliability

FAILURES = 3
POISON = b"{this is not json"


class FlakyDeadLetters:
    """Wraps the dead-letter topic's `send`: the first `failures` sends raise, then the real send.
    `on_attempt(n_failed_so_far)` runs before each attempt (the test checks state there)."""

    def __init__(self, failures: int, on_attempt=None, log: list[str] | None = None):
        self.failures = failures
        self.on_attempt = on_attempt
        self.log: list[str] = log if log is not None else []
        self.failed = 0

    def wrap(self, topic):
        real_send = topic.send

        async def send(*args, **kwargs):
            if self.on_attempt is not None:
                await self.on_attempt(self.failed)
            if self.failed < self.failures:
                self.failed += 1
                self.log.append("failed")
                raise KafkaTimeoutError("broker away (injected by the test)")
            fut = await real_send(*args, **kwargs)
            await fut
            self.log.append("sent")
            return fut

        topic.send = send
        return topic


@contextlib.contextmanager
def flaky_dead_letter_topic(monkeypatch, flaky: FlakyDeadLetters):
    real_raw_topic = streams.raw_topic

    def raw_topic(app, topics, topic):
        t = real_raw_topic(app, topics, topic)
        return flaky.wrap(t) if topic is Topic.dead_letters else t

    monkeypatch.setattr(streams, "raw_topic", raw_topic)
    yield
    monkeypatch.setattr(streams, "raw_topic", real_raw_topic)


async def test_a_dead_letter_that_cannot_be_sent_holds_the_partition_until_it_is_sent(env, monkeypatch):
    """The plain per-event loop (`StreamProcessor.run`: analytics uses it; the batch loops fall back to it)."""
    topics = Topics(env.topic_prefix)
    good = builders.envelope()
    key = b"one-partition"
    await produce(env, topics.case_events, [(key, POISON), (key, good.to_json_bytes())])

    order: list[str] = []
    blocked_seen: list[str | None] = []
    proc_box: list[StreamProcessor] = []

    async def on_attempt(failed_so_far: int) -> None:
        if failed_so_far:
            blocked_seen.append(proc_box[0].blocked)

    flaky = FlakyDeadLetters(FAILURES, on_attempt, log=order)
    with flaky_dead_letter_topic(monkeypatch, flaky):
        app = make_faust_app(env, f"dlq-send-{uuid.uuid4().hex[:6]}")
        proc = StreamProcessor(app=app, topics=topics, group="dlq-send-test", max_backoff_s=0.2)
        proc_box.append(proc)

    async def handler(envelope):
        order.append(f"applied {envelope.id}")

    @app.agent(envelope_topic(app, topics, Topic.case_events), concurrency=1)
    async def work(stream):
        await proc.run(stream, handler)

    async with faust_running(app):
        await wait_until(lambda: f"applied {good.id}" in order, timeout_s=60,
                         what="the event behind the poison to be applied")

    assert order == ["failed"] * FAILURES + ["sent", f"applied {good.id}"], (
        "the poison is dead-lettered once the broker takes it, and the next event waits for it")
    assert len(blocked_seen) == FAILURES and all(b and "cannot send a dead letter" in b for b in blocked_seen), \
        blocked_seen
    assert proc.blocked is None, "ready again once the dead letter is sent"
    dlq = await read_all(env, topics.dead_letters, min_count=1)
    letters = [DeadLetter.from_headers(r.headers, key=r.key, value=r.value) for r in dlq]
    assert [(lt.reason, lt.offset, lt.value) for lt in letters] == [("invalid_json", 0, POISON)]
    print(f"\n[reliability] dead-letter send failed {FAILURES}x: partition held, then {order[-2:]}")


async def test_referral_worker_holds_the_partition_until_the_dead_letter_is_sent(env, monkeypatch):
    """The referral worker's batch loop: while the dead letter of the poison cannot be sent, the
    case behind it gets no referral and /readyz answers 503 naming the dead letter; afterwards
    the poison is on clms.dead-letters once and the case is routed."""
    topics = Topics(env.topic_prefix)
    good = builders.envelope(builders.case_identified())
    key = good.key
    await produce(env, topics.case_events, [(key, POISON), (key, good.to_json_bytes())])

    referrals_while_failing: list[int] = []
    ready_while_failing: list[tuple[int, str]] = []
    client_box: list = []

    async def on_attempt(failed_so_far: int) -> None:
        if failed_so_far:
            referrals_while_failing.append(await referrals_of(env, good.data.case_id))
            r = await client_box[0].get("/readyz")
            ready_while_failing.append((r.status_code, r.text))

    flaky = FlakyDeadLetters(FAILURES, on_attempt)
    with flaky_dead_letter_topic(monkeypatch, flaky):
        app = create_app(env)
        async with running(app) as client:
            client_box.append(client)
            await wait_until(lambda: referrals_of(env, good.data.case_id), timeout_s=60,
                             what="the case behind the poison to be routed")
            ready_after = await client.get("/readyz")

    assert flaky.log == ["failed"] * FAILURES + ["sent"], flaky.log
    assert referrals_while_failing == [0] * FAILURES, "no event behind the poison is applied before its dead letter"
    assert all(code == 503 and "cannot send a dead letter" in text for code, text in ready_while_failing), \
        ready_while_failing
    assert ready_after.status_code == 200, ready_after.text
    dlq = await read_all(env, topics.dead_letters, min_count=1)
    letters = [DeadLetter.from_headers(r.headers, key=r.key, value=r.value) for r in dlq]
    assert [(lt.reason, lt.offset, lt.group) for lt in letters] == [("invalid_json", 0, env.group_id("referral"))]
    assert await referrals_of(env, good.data.case_id) == 2


async def referrals_of(env, case_id) -> int:
    conn = await asyncpg.connect(env.database_url)
    try:
        return await conn.fetchval("select count(*) from referral.referral where case_id = $1", case_id)
    finally:
        await conn.close()
