"""The operator commands as a script runs them: `clms ... | grep` sees whole topic names (never
cut at 80 columns), and `--json` is one document with numbers as numbers and null where unknown.
Each command runs in its own process with stdout piped, against the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from clms.dev import SERVICES
from shared.embedded import free_port
from shared.events import IDENTIFICATION_SUBMITTED
from shared.inbound import dev_sender_key, sign_event
from shared.kafka import DeadLetter, dead_letter, make_consumer, make_producer, send_envelope
from shared.settings import Settings
from shared.topics import Topics
from tests import builders

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


async def clms(settings: Settings, *args: str) -> str:
    """Run `python -m clms ARGS` with stdout piped (not a terminal); return what it printed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLMS_", "KAFKA_", "DATABASE_"))}
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": settings.require_kafka(), "DATABASE_URL": settings.require_database(),
        "CLMS_TOPIC_PREFIX": settings.topic_prefix, "CLMS_ENV": "test",
        "CLMS_BROKER_KIND": settings.kafka_broker_kind, "COLUMNS": "80",
        # nothing listens here: `clms status` must not read whichever stack runs on the default ports
        **{f"{name}_PORT": str(free_port()) for name in ("INTAKE", "REFERRAL", "NOTIFICATIONS", "ANALYTICS")},
    })
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clms", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, f"clms {' '.join(args)} exited {proc.returncode}: {err.decode()[-2000:]}"
    return out.decode()


@pytest.fixture
async def story(env):
    """An agency submission on clms.agency-inbound, the case it became, a group 2 messages behind
    on the inbound topic, and one dead letter from it."""
    topics = Topics(env.topic_prefix)
    submission_id = f"police-prizren-{uuid.uuid4()}"
    submission = sign_event({  # as an agency system publishes it: a JWS of the CloudEvent
        "specversion": "1.0", "id": submission_id, "source": "police/prizren", "type": IDENTIFICATION_SUBMITTED,
        "time": datetime.now(timezone.utc).isoformat(), "datacontenttype": "application/json", "data": {},
    }, dev_sender_key("police/prizren"))
    case = builders.envelope(causationid=submission_id)
    producer = make_producer(env)
    await producer.start()
    try:
        first = await producer.send_and_wait(topics.agency_inbound, submission, key=case.key)
        await send_envelope(producer, topics.case_events, case)
        for _ in range(2):
            await producer.send_and_wait(topics.agency_inbound, b'{"not": "read"}', key=case.key)
        await dead_letter(producer, topics, DeadLetter(
            topic=topics.agency_inbound, partition=first.partition, offset=first.offset, key=case.key,
            value=b'{"redacted": true}', reason="invalid_envelope", error="data.municipality: unknown slug",
            group=env.group_id("intake")))
    finally:
        await producer.stop()
    member = make_consumer(env, group=None, group_id=env.group_id("opsclitest"))
    await member.start()
    try:
        tp = TopicPartition(topics.agency_inbound, first.partition)
        member.assign([tp])
        await member.commit({tp: first.offset + 1})  # the submission consumed, 2 behind
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await member.stop()
    return {"inbound": topics.agency_inbound, "case_id": str(case.subject), "submission_id": submission_id,
            "partition": first.partition, "offset": first.offset, "group": env.group_id("opsclitest")}


def plain_rows(text: str, header_first: str) -> list[dict[str, str]]:
    """The rows of the tab-separated section whose header starts with `header_first`."""
    lines = text.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.split("\t")[0] == header_first]
    assert starts, f"no tab-separated section with a {header_first!r} column in:\n{text}"
    start = starts[0]
    header = lines[start].split("\t")
    rows = []
    for ln in lines[start + 1:]:
        if not ln or ln.startswith("#"):
            break
        rows.append(dict(zip(header, ln.split("\t"), strict=True)))
    return rows


async def test_topics_piped_and_json(env, story):
    inbound = story["inbound"]
    text = await clms(env, "topics")
    assert "…" not in text
    row = next(r for r in plain_rows(text, "topic") if r["topic"] == inbound)
    assert row["partitions"] == "6" and row["messages"] == "3"

    doc = json.loads(await clms(env, "topics", "--json"))
    entry = next(t for t in doc if t["topic"] == inbound)
    assert entry["exists"] is True and entry["partitions"] == 6 and entry["messages"] == 3
    assert len(entry["end_offsets"]) == 6 and sum(entry["end_offsets"]) == 3
    assert {t["topic"] for t in doc} == set(Topics(env.topic_prefix).all())


async def test_lag_piped_and_json(env, story):
    inbound = story["inbound"]
    text = await clms(env, "lag")
    rows = [r for r in plain_rows(text, "group") if r["group"] == story["group"]]
    assert {r["topic"] for r in rows} == {inbound}
    assert sum(int(r["lag"]) for r in rows) == 2
    uncommitted = [r for r in rows if r["partition"] != str(story["partition"])]
    assert uncommitted and all(r["committed"] == "" for r in uncommitted)  # unknown: empty cell

    doc = json.loads(await clms(env, "lag", "--json"))
    mine = [r for r in doc if r["group"] == story["group"]]
    assert sum(r["lag"] for r in mine) == 2
    committed = next(r for r in mine if r["partition"] == story["partition"])
    assert committed == {"group": story["group"], "topic": inbound, "partition": story["partition"],
                         "committed": story["offset"] + 1, "end": story["offset"] + 3, "lag": 2}
    assert all(r["committed"] is None and r["lag"] == r["end"] for r in mine if r is not committed)


async def test_trace_piped_and_json(env, story):
    text = await clms(env, "trace", story["case_id"])
    rows = plain_rows(text, "time")
    assert [(r["event"], r["topic"]) for r in rows] == [
        (IDENTIFICATION_SUBMITTED, story["inbound"]),
        ("case.identified", Topics(env.topic_prefix).case_events)]
    assert rows[0]["event id"] == story["submission_id"] and rows[1]["caused by"] == story["submission_id"]

    doc = json.loads(await clms(env, "trace", story["case_id"], "--json"))
    assert doc["case_id"] == story["case_id"]
    first = doc["events"][0]
    assert first["topic"] == story["inbound"] and first["partition"] == story["partition"]
    assert first["offset"] == story["offset"] and first["causation_id"] is None
    assert datetime.fromisoformat(first["time"]).tzinfo is not None


async def test_dlq_list_piped_and_json(env, story):
    text = await clms(env, "dlq", "list", "--show", "5")
    assert plain_rows(text, "reason") == [{"reason": "invalid_envelope", "count": "1",
                                          "oldest": plain_rows(text, "reason")[0]["oldest"],
                                          "from topics": story["inbound"]}]
    newest = plain_rows(text, "id")
    assert newest[0]["origin topic"] == story["inbound"]
    assert newest[0]["error"] == "data.municipality: unknown slug"

    doc = json.loads(await clms(env, "dlq", "list", "--show", "5", "--json"))
    assert doc["total"] == 1
    assert doc["reasons"][0]["from_topics"] == [story["inbound"]] and doc["reasons"][0]["count"] == 1
    letter = doc["newest"][0]
    assert (letter["origin_topic"], letter["origin_partition"], letter["origin_offset"]) == (
        story["inbound"], story["partition"], story["offset"])
    assert letter["group"] == env.group_id("intake") and letter["reason"] == "invalid_envelope"


async def test_status_piped_and_json(env, story):
    text = await clms(env, "status")
    assert "# consumer lag" in text
    assert {"group": story["group"], "topic": story["inbound"], "lag": "2"} in plain_rows(text, "group")
    assert [r["state"] for r in plain_rows(text, "service")] == ["down"] * len(SERVICES)

    doc = json.loads(await clms(env, "status", "--json"))
    assert set(doc) == {"services", "consumer_lag", "dead_letters", "outbox"}
    assert {"group": story["group"], "topic": story["inbound"], "lag": 2} in doc["consumer_lag"]
    assert doc["dead_letters"] == 1
    assert all(s["state"] == "down" and s["checks"] is None for s in doc["services"])
    assert {o["schema"]: o["error"] for o in doc["outbox"]} == {
        "intake": "no schema yet", "referral": "no schema yet", "notifications": "no schema yet"}
