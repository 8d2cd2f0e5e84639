"""Order per case: the events of one case are applied in the order they were made, also with two
referral workers in one consumer group and rebalances in the middle (a second worker joins, then
the first is killed)."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from datetime import date

import asyncpg
import pytest

from shared import events as ev
from shared.embedded import free_port
from shared.kafka import make_producer, send_envelope
from shared.topics import Topics
from tests import builders
from tests.e2e.harness import running_system
from tests.infra import wait_until

pytestmark = pytest.mark.reliability

CASES = 40
PER_CASE = 6  # identified, 4 updates, closed


def case_story(case: ev.CaseIdentified) -> list[ev.Envelope]:
    first = builders.envelope(case)
    story = [first]
    statuses = [ev.SchoolStatus.enrolled_irregular, ev.SchoolStatus.dropped_out,
                ev.SchoolStatus.enrolled_attending, ev.SchoolStatus.enrolled_irregular]
    for status in statuses:
        story.append(story[-1].follow(ev.CaseUpdated(case_id=case.case_id, municipality=case.municipality,
                                                     school_status=status, updated_by_agency=ev.AgencyType.csw),
                                      source="csw/" + case.municipality))
    story.append(story[-1].follow(ev.CaseClosed(case_id=case.case_id, municipality=case.municipality,
                                                on=date.today(), confirmed_by_agency=ev.AgencyType.csw,
                                                reason=ev.CaseClosedReason.resolved), source="csw/" + case.municipality))
    return story


async def test_events_of_one_case_are_applied_in_order_across_rebalances(tmp_path):
    async with running_system(tmp_path / "sys", services=("referral",)) as system:
        settings = system.settings
        topics = Topics(settings.topic_prefix)
        stories = [case_story(builders.case_identified(municipality="gjilan")) for _ in range(CASES)]
        made_order = {str(e.id): (e.subject, i) for story in stories for i, e in enumerate(story)}

        async def publish() -> None:
            producer = make_producer(settings)
            await producer.start()
            try:
                for step in range(PER_CASE):  # interleave cases, keep each case's order
                    for story in stories:
                        await send_envelope(producer, topics.case_events, story[step])
                    await asyncio.sleep(1.0)
            finally:
                await producer.stop()

        async def rebalance() -> None:
            loop = asyncio.get_running_loop()
            await asyncio.sleep(1.5)
            second = system.sup.start_service("referral", label="referral-2", port=free_port())
            await loop.run_in_executor(None, lambda: system.sup.wait_ready(only="referral-2"))
            await asyncio.sleep(1.0)
            first = system.sup.child("referral")
            os.kill(first.proc.pid, signal.SIGKILL)
            first.proc.wait(10)
            assert second.proc.poll() is None

        await asyncio.gather(publish(), rebalance())

        conn = await asyncpg.connect(settings.database_url)
        try:
            async def all_applied():
                n = await conn.fetchval("select count(*) from referral.inbox where event_id = any($1::uuid[])",
                                        [uuid.UUID(i) for i in made_order])
                return n if n == len(made_order) else None
            await wait_until(all_applied, timeout_s=90, what=f"{len(made_order)} case events applied", interval_s=0.5)
            rows = await conn.fetch("select event_id::text, applied_at from referral.inbox "
                                    "where event_id = any($1::uuid[]) order by applied_seq",
                                    [uuid.UUID(i) for i in made_order])
        finally:
            await conn.close()
        applied: dict[str, list[int]] = {}
        for r in rows:
            case_id, step = made_order[r["event_id"]]
            applied.setdefault(case_id, []).append(step)
        out_of_order = {c: steps for c, steps in applied.items() if steps != sorted(steps)}
        assert not out_of_order, f"cases applied out of order: {list(out_of_order.items())[:3]}"
        assert all(len(steps) == PER_CASE for steps in applied.values())
        print(f"\n[reliability] {len(rows)} events of {CASES} cases applied in order by two workers "
              "across a join and a kill")
