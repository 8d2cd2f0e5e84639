"""A referral worker interrupted in the middle of a batch acks nothing it did not apply: after a
restart (same consumer group) every event of the batch is applied, each exactly once.

Six case.identified events on one partition reach the worker as one batch (or a few). The
failure is injected through the service functions the worker calls (`service.apply_case_events`
for a whole batch, `service.apply_case_event` for one event):
- the batch statement fails, so the worker applies the events one by one;
- the first two events are applied; the third one hangs in its handler (a slow database), and
  then either
  * `stopped`: the worker is stopped (a rolling deploy: SIGTERM -> the agent is cancelled), or
  * `cancelled`: the handler itself ends with `CancelledError` (a task it awaited was
    cancelled); faust restarts the agent and the worker is stopped after that.
A second worker in the same consumer group then starts with the real functions.

With faust's `take_events` the interrupted batch was acked in a `finally` and committed, so the
events the first worker never applied were lost.
"""

from __future__ import annotations

import asyncio

import pytest

from services.referral import service
from services.referral.app import create_app
from shared.events import parse_envelope
from shared.topics import Topics
from tests import builders
from tests.apps import running
from tests.infra import db_rows, wait_until
from tests.kafka_helpers import produce, read_all

pytestmark = pytest.mark.reliability

EVENTS = 6
STOP_AT = 2  # events 0 and 1 are applied, event 2 is interrupted, 3.. are never reached
PER_CASE = 2  # a 12-year-old in Prizren: CSW + education


@pytest.mark.parametrize("interruption", ["stopped", "cancelled"])
async def test_events_of_an_interrupted_batch_are_applied_exactly_once_after_a_restart(env, monkeypatch,
                                                                                     interruption):
    topics = Topics(env.topic_prefix)
    cases = [builders.envelope(builders.case_identified()) for _ in range(EVENTS)]
    key = b"one-partition"  # one partition, so the events come in order and batch together
    await produce(env, topics.case_events, [(key, c.to_json_bytes()) for c in cases])

    real_one, real_batch = service.apply_case_event, service.apply_case_events
    reached = asyncio.Event()
    handled_after_interruption: list[str] = []

    async def batch_statement_fails(deps, *, envelopes):
        if len(envelopes) > 1:
            raise RuntimeError("injected: the batch statement failed")
        return await real_batch(deps, envelopes=envelopes)  # apply_case_event is a batch of one

    async def one_event(deps, *, envelope):
        if reached.is_set():
            handled_after_interruption.append(str(envelope.id))
        if envelope.id == cases[STOP_AT].id and not reached.is_set():
            reached.set()
            if interruption == "stopped":
                await asyncio.Event().wait()  # hangs until the worker is stopped
            raise asyncio.CancelledError()
        return await real_one(deps, envelope=envelope)

    monkeypatch.setattr(service, "apply_case_events", batch_statement_fails)
    monkeypatch.setattr(service, "apply_case_event", one_event)
    first = create_app(env)
    async with running(first):
        await asyncio.wait_for(reached.wait(), 60)
        if interruption == "cancelled":
            # faust restarts the agent; whatever it handles next is not the interrupted batch
            await asyncio.sleep(0)
    monkeypatch.undo()

    applied_by_first = await cases_routed(env, cases)
    assert applied_by_first[:STOP_AT + 1] == [True] * STOP_AT + [False], applied_by_first

    second = create_app(env)
    async with running(second):
        await wait_until(lambda: all_routed(env, cases), timeout_s=60,
                         what="every event of the interrupted batch to be applied after the restart")

    rows = await db_rows(env, "select case_id, count(*) as n from referral.referral group by case_id")
    assert {r["case_id"]: r["n"] for r in rows} == {c.data.case_id: PER_CASE for c in cases}
    inbox = await db_rows(env, "select event_id from referral.inbox")
    assert sorted(r["event_id"] for r in inbox) == sorted(c.id for c in cases), "each event applied once"
    created = await db_rows(env, "select count(*) as n from referral.outbox where event_type = 'referral.created'")
    assert created[0]["n"] == EVENTS * PER_CASE, "one referral.created per referral, none twice"
    records = await read_all(env, topics.referral_events, min_count=EVENTS * PER_CASE)
    on_topic = [parse_envelope(r.value) for r in records]
    assert len({e.id for e in on_topic}) == EVENTS * PER_CASE
    print(f"\n[reliability] interrupted ({interruption}) at event {STOP_AT} of {EVENTS}: after the restart "
          f"{EVENTS} events applied once each, {EVENTS * PER_CASE} referrals")


async def cases_routed(env, cases) -> list[bool]:
    rows = await db_rows(env, "select distinct case_id from referral.referral")
    routed = {r["case_id"] for r in rows}
    return [c.data.case_id in routed for c in cases]


async def all_routed(env, cases) -> bool:
    return all(await cases_routed(env, cases))
