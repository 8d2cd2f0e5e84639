"""clms.agency-inbound -> intake: a valid identification.submitted CloudEvent becomes a case (once,
however often it is delivered); broken ones become dead letters with their reason, and the
partition keeps moving. Plus the outbox relay across a broker outage."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import asyncpg
import orjson
import pytest

from shared.events import IDENTIFICATION_SUBMITTED, parse_envelope
from shared.inbound import dev_sender_key, inbound_message, sign_event
from shared.kafka import DeadLetter, make_producer
from shared.outbox import OutboxRelay
from shared.topics import Topics
from services.intake.app import create_app
from services.intake.inbound import public_key
from tests.apps import bearer, running
from tests.infra import wait_until
from tests.integration.test_intake_api import identification
from tests.kafka_helpers import produce, read_all

pytestmark = pytest.mark.integration


def cloudevent(**over) -> dict:
    ev = {
        "specversion": "1.0",
        "id": "kp-prizren-000123",
        "source": "police/prizren",
        "type": IDENTIFICATION_SUBMITTED,
        "time": "2026-01-31T10:00:00Z",
        "datacontenttype": "application/json",
        "correlationid": "kp-corr-123",
        "reportedby": "police.prizren.officer17",
        "data": identification(),
    }
    ev.update(over)
    return ev


async def count(env, sql: str) -> int:
    conn = await asyncpg.connect(env.database_url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def sealed(env, event: dict, sender=None) -> bytes:
    """What an agency system publishes: personal part encrypted to intake, event signed by the office."""
    return inbound_message(event, recipient=public_key(env), sender=sender)


# what must never be readable on the inbound topic (child name, guardian name and phone, birth date, notes)
PERSONAL = ("Krasniqi", "Arbër", "Shpresa", "123 456", "2014-03-09", "bus station")


async def test_inbound_cloudevent_becomes_a_case_and_broken_ones_dead_letters(env):
    topics = Topics(env.topic_prefix)
    key = b"kp-prizren"  # one partition, so the order and offsets below are known
    good = sealed(env, cloudevent())
    bad_sex = cloudevent(id="kp-2", data=identification(child={**identification()["child"], "sex": "x"}))
    prosecution = cloudevent(id="kp-4", source="prosecution/prizren", reportedby="prosecution.prizren.x")
    items = [
        (key, good),
        (key, b"{not json"),
        (key, sealed(env, cloudevent(id="kp-3", type="case.identified"))),
        (key, sealed(env, prosecution)),
        (key, sealed(env, bad_sex)),
        (key, good),  # redelivered / re-sent: still one case
        (key, sealed(env, cloudevent(id="kp-5", data=identification(municipality="prishtine")))),
    ]
    await produce(env, topics.agency_inbound, items)

    async with running(create_app(env)) as client:
        await wait_until(lambda: count(env, "select count(*) from intake.cases"), timeout_s=30,
                         what="inbound identifications to become cases")
        await wait_until(lambda: _equals(count(env, "select count(*) from intake.cases"), 2), timeout_s=20,
                         what="both valid inbound identifications to become cases")
        dlq = await read_all(env, topics.dead_letters, min_count=4)
        published = await read_all(env, topics.case_events, min_count=2)

        # the case is readable by the sending office, with the reporter the agency named, and the
        # personal part intake decrypted
        case_id = str(uuid.uuid5(uuid.uuid5(uuid.NAMESPACE_URL, "clms-inbound:police/prizren:kp-prizren-000123"),
                                 "case"))
        view = await client.get(f"/v1/cases/{case_id}", headers=bearer(
            env, sub="police.prizren.duty", agency="police", municipality="prizren", roles=["caseworker"]))
        assert view.status_code == 200, view.text
        assert view.json()["reported_by"] == "police.prizren.officer17"
        personal = view.json()["personal"]
        assert personal["family_name"] == "Krasniqi" and personal["date_of_birth"] == "2014-03-09"
        assert personal["guardian"]["phone"] == "+383 44 123 456" and personal["notes"] == "seen near the bus station"

    letters = [DeadLetter.from_headers(r.headers, key=r.key, value=r.value) for r in dlq]
    assert [x.reason for x in letters] == ["invalid_json", "unknown_type", "invalid_envelope", "invalid_identification"]
    assert [x.offset for x in letters] == [1, 2, 3, 4]
    assert all(x.topic == topics.agency_inbound and x.group == f"{env.topic_prefix}intake" for x in letters)
    assert "does not identify children" in letters[2].error and "source" in letters[2].error
    assert "data.child.sex" in letters[3].error and "'female'" in letters[3].error
    # identity does not travel onward: the dead letter points at the original instead of copying it
    assert all(b"Krasniqi" not in (r.value or b"") for r in dlq)

    assert len(published) == 2
    envs = [parse_envelope(r.value) for r in published]
    assert {e.type for e in envs} == {"case.identified"}
    first = next(e for e in envs if e.subject == case_id)
    assert first.correlationid == "kp-corr-123" and first.causationid == "kp-prizren-000123"
    assert first.source == "police/prizren" and first.data.reported_by == "police.prizren.officer17"
    assert all(b"Krasniqi" not in r.value for r in published)
    assert await count(env, "select count(*) from intake.inbox where consumer = 'intake.agency-inbound'") == 2

    # issue 15: the inbound topic itself holds no personal field in plaintext
    inbound = await read_all(env, topics.agency_inbound, min_count=len(items))
    assert len(inbound) == len(items)
    for r in inbound:
        text = (r.value or b"").decode(errors="replace") + str(r.headers)
        leaked = [v for v in PERSONAL if v in text]
        assert not leaked, f"{leaked} in plaintext on {r.topic}@{r.offset}"


async def test_plaintext_unsigned_and_forged_identifications_are_dead_lettered_with_the_reason(env):
    """Outside development (tests run with CLMS_ENV=test) an identification is accepted only when
    its office signed it and its personal part is encrypted; the rest become dead letters whose
    reason names the field or the sender, never a personal value (issues 15 and 16)."""
    topics = Topics(env.topic_prefix)
    key = b"kp-refused"
    plaintext = sign_event(cloudevent(id="kp-plain"), dev_sender_key("police/prizren"))
    unsigned = orjson.dumps(cloudevent(id="kp-unsigned"))
    forged = sealed(env, cloudevent(id="kp-forged", source="police/peje", reportedby="police.peje.duty"),
                    sender=dev_sender_key("police/prizren"))
    other_office = sealed(env, cloudevent(id="kp-other", reportedby="police.peje.duty"))
    good = sealed(env, cloudevent(id="kp-good"))
    await produce(env, topics.agency_inbound, [(key, plaintext), (key, unsigned), (key, forged),
                                                (key, other_office), (key, good)])

    async with running(create_app(env)):
        await wait_until(lambda: _equals(count(env, "select count(*) from intake.cases"), 1), timeout_s=30,
                         what="the one signed, encrypted identification to become a case")
        dlq = await read_all(env, topics.dead_letters, min_count=4)
    letters = [DeadLetter.from_headers(r.headers, key=r.key, value=r.value) for r in dlq]
    assert [(x.offset, x.reason) for x in letters] == [
        (0, "plaintext_personal_data"), (1, "unauthenticated_sender"), (2, "unauthenticated_sender"),
        (3, "unauthenticated_sender")]
    assert "data.child.given_name" in letters[0].error and "data.notes" in letters[0].error
    assert "unsigned" in letters[1].error
    assert "police/prizren" in letters[2].error and "police/peje" in letters[2].error
    assert "reportedby" in letters[3].error
    for r in dlq:
        text = (r.value or b"").decode(errors="replace") + str(r.headers)
        assert not [v for v in PERSONAL if v in text], text
    # the forged one did not become a case of police/peje
    assert await count(env, "select count(*) from intake.cases where reporter_municipality = 'peje'") == 0


async def _equals(awaitable, expected) -> bool:
    return (await awaitable) == expected


async def test_relay_delivers_after_a_broker_outage_and_a_deduping_consumer_sees_each_event_once(env):
    topics = Topics(env.topic_prefix)
    headers = bearer(env, sub="police.prizren.duty", agency="police", municipality="prizren", roles=["reporter"])
    async with running(create_app(env, run_relay=False, run_consumer=False)) as client:
        case_ids = []
        for _ in range(5):
            r = await client.post("/v1/identifications", json=identification(), headers=headers)
            case_ids.append(r.json()["case_id"])
        pool = client._transport.app.state.deps.pool  # type: ignore[attr-defined]

        # the broker is unreachable: the relay keeps failing, the rows wait
        dead = make_producer(env.model_copy(update={"kafka_bootstrap_servers": "127.0.0.1:1"}),
                             request_timeout_ms=300, metadata_max_age_ms=300)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(dead.start(), 2)
        broken = OutboxRelay(pool=pool, schema="intake", producer=dead, topics=topics, poll_interval_s=0.02,
                             send_timeout_s=0.5)
        task = asyncio.create_task(broken.run())
        await wait_until(lambda: broken.failed_attempts >= 2, timeout_s=30,
                         what="the relay to try the unreachable broker twice")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(Exception):
            await dead.stop()
        assert broken.published_total == 0
        assert await count(env, "select count(*) from intake.outbox where published_at is null") == 5

        # the broker is back: a relay drains every committed row, in order
        good = make_producer(env)
        await good.start()
        try:
            relay = OutboxRelay(pool=pool, schema="intake", producer=good, topics=topics)
            assert await relay.publish_batch() == 5
            # a crash between send and mark: two rows are sent again
            async with pool.acquire() as conn:
                await conn.execute("update intake.outbox set published_at = null where seq in "
                                   "(select seq from intake.outbox order by seq limit 2)")
            assert await relay.publish_batch() == 2
        finally:
            await good.stop()

    records = await read_all(env, topics.case_events, min_count=7)
    assert len(records) == 7  # at least once: the two re-sent rows are on the topic twice
    seen: set[str] = set()
    applied = []
    for r in records:  # a consumer that dedupes on the event id
        e = parse_envelope(r.value)
        if str(e.id) in seen:
            continue
        seen.add(str(e.id))
        applied.append(e.subject)
    assert sorted(applied) == sorted(case_ids)
    assert await count(env, "select count(*) from intake.outbox where published_at is null") == 0


async def test_an_office_without_a_registered_key_is_refused_and_replayed_once_its_key_is_registered(env, tmp_path):
    """With a sender registry (production's way), an office whose key is not registered cannot
    publish; once its public key is registered, `clms dlq replay` re-publishes the original from the
    inbound topic, signature intact, and it becomes the case (issue 16)."""
    import yaml
    from jwcrypto import jwk

    from clms.ops import dead_letters, replay_dead_letters

    topics = Topics(env.topic_prefix)
    office = jwk.JWK.generate(kty="EC", crv="P-256", kid="police-prizren-2026")
    other = jwk.JWK.generate(kty="EC", crv="P-256", kid="police-peje-2026")
    registry = tmp_path / "senders.yaml"
    registry.write_text(yaml.safe_dump({"senders": {"police/peje": [other.export_public(as_dict=True)]}}))
    settings = env.model_copy(update={"inbound_senders_file": registry})
    await produce(env, topics.agency_inbound, [(b"kp-reg", sealed(env, cloudevent(id="kp-reg"), sender=office))])

    async with running(create_app(settings)):
        letters = await wait_until(dead_letters_of(env), timeout_s=30, what="the unregistered office's dead letter")
    assert [d.letter.reason for d in letters] == ["unauthenticated_sender"]
    assert "no signing key is registered for source 'police/prizren'" in letters[0].letter.error
    assert await count(env, "select count(*) from intake.cases") == 0

    registry.write_text(yaml.safe_dump({"senders": {"police/peje": [other.export_public(as_dict=True)],
                                                    "police/prizren": [office.export_public(as_dict=True)]}}))
    result = await replay_dead_letters(env, ids=[letters[0].id])
    assert result.replayed == [letters[0].id] and result.refused == []
    async with running(create_app(settings)):
        await wait_until(lambda: _equals(count(env, "select count(*) from intake.cases"), 1), timeout_s=30,
                         what="the replayed identification to become a case")
    assert len(await dead_letters(env)) == 1


def dead_letters_of(env):
    from clms.ops import dead_letters

    async def check():
        return await dead_letters(env) or None
    return check
