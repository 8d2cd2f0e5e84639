"""Issue 15, item 5: `clms erase` erases. Real broker, real PostgreSQL, intake + referral +
notifications + analytics running in this process (so every schema holds rows about the cases,
and analytics' faust changelog `<prefix>analytics-analytics-cases-changelog` holds their states).

After erasing every case of one child, the whole database (every table of every schema) and
every topic of the test (case, referral, notification and dead-letter topics, analytics' table
changelog) are scanned for the
child's name, guardian phone, the cross-case pseudonym intake keeps for linking and the per-case
tokens the cases had. What may remain is exactly what the README's Privacy section says remains,
asserted here record by record: the case.identified records already on clms.case-events (and a
dead letter copied from one), carrying a per-case token nobody can recompute or link any more.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import date

import asyncpg
import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from typer.testing import CliRunner

from services.analytics.app import create_app as analytics_app
from services.analytics.rules import BREAKDOWNS
from services.analytics.rebuild import changelog_topic
from services.intake.app import create_app as intake_app
from services.intake.cli import app as intake_cli
from services.notifications.app import create_app as notifications_app
from services.notifications.sink import Sink
from services.referral.app import create_app as referral_app
from shared import events as ev
from shared.embedded import free_port
from shared.kafka import DeadLetter, connection_kwargs, ensure_topics, make_producer
from shared.outbox import replay
from shared.topics import Topics
from tests.apps import bearer, running
from tests.infra import wait_until
from tests.kafka_helpers import produce, read_all

pytestmark = pytest.mark.integration

ERASED_CHILD_REF = "ct_erased_case_no_token"  # services.intake.crypto.ERASED_CHILD_REF

NAME, FAMILY, GUARDIAN, PHONE = "Vjollcë", "Berishaj", "Mimoza Berishaj", "+383 49 555 017"
SECRETS = [NAME, "Vjollce", FAMILY, GUARDIAN, PHONE, "2013-07-21", "found at the brickworks"]


def child(**over) -> dict:
    body = {
        "municipality": "prizren", "identified_on": date.today().isoformat(), "report_source": "officer",
        "child": {"given_name": NAME, "family_name": FAMILY, "date_of_birth": "2013-07-21", "sex": "female",
                  "community": "roma", "school_status": "dropped_out",
                  "guardian": {"name": GUARDIAN, "relationship": "mother", "phone": PHONE}},
        "work": {"sector": "construction", "activity": "brick_making", "hazardous": True,
                 "employer_involved": True},
        "notes": "found at the brickworks",
    }
    body.update(over)
    return body


def police(env):
    return bearer(env, sub="police.prizren.duty", agency="police", municipality="prizren", roles=["reporter"])


async def db_rows(env) -> list[tuple[str, str]]:
    """Every row of every table of every schema of the test database, as text."""
    conn = await asyncpg.connect(env.database_url)
    try:
        tables = await conn.fetch(
            "select table_schema, table_name from information_schema.tables "
            "where table_schema not in ('pg_catalog', 'information_schema') and table_type = 'BASE TABLE'")
        out = []
        for t in tables:
            name = f'"{t["table_schema"]}"."{t["table_name"]}"'
            for r in await conn.fetch(f"select t::text as row from {name} t"):
                out.append((name, r["row"]))
        return out
    finally:
        await conn.close()


async def topic_records(env) -> list[tuple[str, object]]:
    """Every record of every topic of this test (its prefix): key, value and header bytes."""
    admin = AIOKafkaAdminClient(**connection_kwargs(env))
    await admin.start()
    try:
        names = sorted(t for t in await admin.list_topics() if t.startswith(env.topic_prefix))
    finally:
        await admin.close()
    out = []
    for name in names:
        for r in await read_all(env, name, timeout_s=5, idle_s=0.3):
            out.append((name, r))
    return out


def blob(record) -> bytes:
    return b"|".join([record.key or b"", record.value or b""] + [v or b"" for _, v in record.headers])


def needles(*texts: str) -> list[bytes]:
    """A text as it could be stored: UTF-8, JSON-escaped, hex (bytea), case-folded."""
    out = []
    for t in texts:
        out += [t.encode(), t.lower().encode(), orjson.dumps(t)[1:-1], t.encode().hex().encode()]
    return out


def found(haystack: bytes, texts: list[str]) -> list[str]:
    low = haystack.lower()
    return [t for t in texts if any(n.lower() in low for n in needles(t))]


@dataclass(frozen=True)
class Erased:
    """One system run in which one child was reported twice (linked), another child once, and
    the first child's two cases were erased with `clms erase`; the scans before and after."""
    settings: object
    topics: Topics
    first: dict
    second: dict
    other: dict
    cases: tuple[str, ...]       # the erased cases
    tokens: tuple[str, ...]      # their per-case tokens, as the API returned them
    pseudonym: str               # the cross-case pseudonym intake kept for linking them
    changelog: str               # analytics' table changelog topic
    view: dict                   # GET of the other child's case, after erasure
    gone: dict                   # GET of the second erased case, after erasure
    before_db: bytes             # every database row, before erasure
    before_topics: bytes         # every record of every topic of the test, before erasure
    after_topics: tuple          # (topic, record) of every topic of the test, after erasure


@pytest.fixture(scope="module")
async def erased(module_env):
    """Built once for the module (the tests below only read what it left)."""
    return await _report_and_erase(module_env)


async def _report_and_erase(env) -> Erased:
    topics = Topics(env.topic_prefix)
    sink = await Sink(smtp_port=free_port(), http_port=free_port(),
                      webhook_secret=env.webhook_secret.get_secret_value()).start()
    settings = env.model_copy(update={"smtp_port_override": sink.smtp_port,
                                      "sms_webhook_url_override": f"http://127.0.0.1:{sink.http_port}/sms",
                                      "notify_poll_interval_s": 0.1})
    try:
        intake = intake_app(settings)
        async with running(intake) as client, running(referral_app(settings)), \
                running(notifications_app(settings)), running(analytics_app(settings)):
            first = (await client.post("/v1/identifications", json=child(),
                                       headers={**police(settings), "Idempotency-Key": "erase-me-1"})).json()
            second = (await client.post("/v1/identifications", json=child(notes=None),
                                        headers={**police(settings), "Idempotency-Key": "erase-me-2"})).json()
            other = (await client.post("/v1/identifications", json=child(
                child={**child()["child"], "given_name": "Besa", "family_name": "Hoxha"}, notes=None),
                headers=police(settings))).json()
            assert second["linked_case_id"] == first["case_id"]
            cases = [first["case_id"], second["case_id"]]
            conn = await asyncpg.connect(settings.database_url)
            try:
                pseudonym = await conn.fetchval("select child_ref from intake.cases where case_id = $1",
                                                uuid.UUID(first["case_id"]))
                # a referral reached intake (access rows) and an alert was rendered for every case
                for cid in (*cases, other["case_id"]):
                    await wait_until(lambda cid=cid: conn.fetchval(
                        "select count(*) from intake.case_access where case_id = $1", uuid.UUID(cid)),
                        timeout_s=60, what=f"referral access rows of case {cid}")
                    await wait_until(lambda cid=cid: conn.fetchval(
                        "select count(*) from notifications.notifications where case_id = $1", uuid.UUID(cid)),
                        timeout_s=60, what=f"notifications of case {cid}")
            finally:
                await conn.close()
            tokens = [first["child_ref"], second["child_ref"]]
            # analytics has folded each case, its referrals and its alerts into its table
            changelog = changelog_topic(settings, settings.analytics_app_id)

            async def folded() -> bool:
                states = {r.key: orjson.loads(r.value) for r in await read_all(
                    settings, changelog, timeout_s=2, idle_s=0.2) if r.value}
                return all((s := states.get(cid.encode())) and s["id"] and s["r"] and s["n"]
                           for cid in (*cases, other["case_id"]))
            await wait_until(folded, timeout_s=90, what="analytics' changelog to hold every case with referrals and alerts")

            # a consumer dead-letters a damaged copy of the first case's case.identified
            original = next(r for r in await read_all(settings, topics.case_events, min_count=3)
                            if r.key == first["case_id"].encode())
            damaged = original.value.replace(b'"case.identified"', b'"case.identifiedx"')
            await produce(settings, topics.case_events, [(original.key, damaged)])
            await wait_until(lambda: read_all(settings, topics.dead_letters, min_count=1, timeout_s=2, idle_s=0.2),
                             timeout_s=30, what="a dead letter of the damaged event")

            before_db = b"\n".join(row.encode() for _, row in await db_rows(settings))
            before_topics = b"\n".join(blob(r) for _, r in await topic_records(settings))

            runner = CliRunner()
            cli_env = {"DATABASE_URL": settings.database_url, "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers}
            for cid in cases:
                result = await asyncio.to_thread(runner.invoke, intake_cli, ["erase", cid, "--yes"], env=cli_env)
                assert result.exit_code == 0, result.output

            view = (await client.get(f"/v1/cases/{other['case_id']}", headers=police(settings))).json()
            gone = (await client.get(f"/v1/cases/{second['case_id']}", headers=police(settings))).json()
    finally:
        await sink.stop()
    # one scan of every topic after erasure, read by the topic and changelog tests below
    after_topics = tuple(await topic_records(settings))
    return Erased(settings=settings, topics=topics, first=first, second=second, other=other,
                  cases=tuple(cases), tokens=tuple(tokens), pseudonym=pseudonym, changelog=changelog,
                  view=view, gone=gone, before_db=before_db, before_topics=before_topics,
                  after_topics=after_topics)


async def test_the_scans_find_the_pseudonym_and_tokens_before_erasure(erased: Erased):
    """The scans below are not blind: before erasure they do find what they look for."""
    e = erased
    assert found(e.before_db, [e.pseudonym, *e.tokens]) == [e.pseudonym, *e.tokens]
    assert found(e.before_topics, list(e.tokens)) == list(e.tokens)


OTHER_SCHEMAS = "other_schemas"  # every schema not named in the list


@pytest.mark.parametrize("schema", ["intake", "referral", "notifications", OTHER_SCHEMAS])
async def test_no_database_row_holds_identity_pseudonym_or_token_after_erasure(erased: Erased, schema: str):
    """No name, phone, birth date or note, no pseudonym, no token, in any row of any table (by
    schema, so a failure names the service that kept a copy)."""
    e = erased
    named = {"intake", "referral", "notifications"}
    for table, row in await db_rows(e.settings):
        table_schema = table.split(".")[0].strip('"')
        if (table_schema != schema) if schema != OTHER_SCHEMAS else (table_schema in named):
            continue
        assert not found(row.encode(), [*SECRETS, e.pseudonym, *e.tokens]), f"{table} still holds {row[:300]}"


async def test_erasure_leaves_no_link_idempotency_key_or_case_key(erased: Erased):
    e = erased
    conn = await asyncpg.connect(e.settings.database_url)
    try:
        assert await conn.fetchval("select count(*) from intake.cases where linked_case_id = any($1::uuid[])",
                                   [uuid.UUID(c) for c in e.cases]) == 0
        assert await conn.fetchval("select count(*) from intake.idempotency_keys") == 0
        assert await conn.fetchval("select count(*) from intake.case_keys where case_id = any($1::uuid[])",
                                   [uuid.UUID(c) for c in e.cases]) == 0
    finally:
        await conn.close()


async def test_the_outbox_keeps_the_erased_cases_facts_with_the_erased_marker(erased: Erased):
    """The outbox `make run` replays keeps the facts of the erased cases, with the erased marker."""
    e = erased
    conn = await asyncpg.connect(e.settings.database_url)
    try:
        kept = await conn.fetch("select envelope from intake.outbox where event_type = 'case.identified' "
                                "and key = any($1::text[])", list(e.cases))
    finally:
        await conn.close()
    assert [orjson.loads(r["envelope"])["data"]["child_ref"] for r in kept] == [ERASED_CHILD_REF] * 2


async def test_the_other_child_stays_readable_and_the_erased_case_keeps_its_facts(erased: Erased):
    e = erased
    assert e.view["personal"]["given_name"] == "Besa" and e.view["child_ref"] == e.other["child_ref"]
    assert e.gone["personal"] is None and e.gone["child_ref"] is None and e.gone["linked_case_id"] is None
    assert e.gone["repeat_identification"] is False and e.gone["sector"] == "construction"


async def test_the_outbox_replayed_into_an_empty_broker_carries_no_token(erased: Erased):
    """Replayed into an empty broker (what `make run` does), the outbox carries no identity, no
    pseudonym, no token and no link; the erased cases keep their facts."""
    e = erased
    fresh = e.settings.model_copy(update={"topic_prefix": f"r{uuid.uuid4().hex[:8]}."})
    await ensure_topics(fresh)
    pool = await asyncpg.create_pool(e.settings.database_url, min_size=1, max_size=1)
    producer = make_producer(fresh)
    await producer.start()
    try:
        await replay(pool=pool, schema="intake", producer=producer, topics=Topics(fresh.topic_prefix))
    finally:
        await producer.stop()
        await pool.close()
    replayed = await read_all(fresh, Topics(fresh.topic_prefix).case_events, min_count=3)
    assert len(replayed) == 3
    for r in replayed:
        assert not found(blob(r), [*SECRETS, e.pseudonym, *e.tokens])
        data = ev.parse_envelope(r.value).data
        assert data.linked_case_id is None
        if str(data.case_id) in e.cases:
            assert data.child_ref == ERASED_CHILD_REF and data.sector is ev.Sector.construction


async def test_no_topic_holds_identity_or_pseudonym_after_erasure(erased: Erased):
    """Every topic of the running system (case, referral, notification, dead-letter topics,
    analytics' changelog): no identity anywhere, no pseudonym anywhere."""
    e = erased
    for topic, r in e.after_topics:
        assert not found(blob(r), [*SECRETS, e.pseudonym]), f"{topic} still holds identity: {blob(r)[:300]!r}"


async def test_tokens_remain_only_in_case_identified_records_already_written_and_their_dead_letter(
        erased: Erased):
    """The per-case tokens remain only where the README says (records already written to
    clms.case-events and a dead letter copied from one of them), until those topics' retention."""
    e = erased
    topics, cases, tokens = e.topics, list(e.cases), list(e.tokens)
    remaining = []
    for topic, r in e.after_topics:
        if hits := found(blob(r), [*SECRETS, e.pseudonym, *tokens]):
            remaining.append((topic, r, hits))
    assert {t for t, _, _ in remaining} == {topics.case_events, topics.dead_letters}
    for topic, r, hits in remaining:
        if topic == topics.dead_letters:
            letter = DeadLetter.from_headers(r.headers, key=r.key, value=r.value)
            assert letter.topic == topics.case_events and r.key == e.first["case_id"].encode()
            assert hits == [tokens[0]]
        else:
            # the case.identified of each erased case (and the damaged copy of the first)
            assert r.key.decode() in cases and len(hits) == 1
            assert hits == [tokens[cases.index(r.key.decode())]]
            assert orjson.loads(r.value)["data"]["linked_case_id"] is None
    on_case_events = sorted(h[0] for t, _, h in remaining if t == topics.case_events)
    assert on_case_events == sorted([tokens[0], tokens[0], tokens[1]])


async def test_analytics_changelog_carries_categories_only_keyed_by_case_id(erased: Erased):
    """Analytics' table changelog (compacted, so its latest record per case stays for good) was
    part of the topic scan; it carries categories only, keyed by case id."""
    e = erased
    states = [r for t, r in e.after_topics if t == e.changelog and r.value]
    assert {r.key.decode() for r in states} >= {*e.cases, e.other["case_id"]}  # the scan is not blind
    for r in states:
        state = orjson.loads(r.value)
        assert set(state) == {"mu", "mo", "fm", "id", "w", "e", "c", "r", "n", "s"}, state
        # a case's referral events can reach analytics before its case.identified (another
        # topic): such a state has no identification categories yet
        assert state["id"] is None or (state["mu"] == "prizren" and set(state["id"]) == set(BREAKDOWNS))
        assert all(set(ref) == {"a", "m", "s", "c", "k", "ka", "t", "ac", "cp", "o"} for ref in state["r"].values())


async def test_erase_relinks_later_cases_and_unnames_the_case_in_older_outbox_rows(env):
    """Three reports of one child: erasing the first re-links the third to the second; a
    case.identified written before per-case tokens (cross-case `cr_` pseudonym, a link) loses both."""
    from services.intake import service
    from services.intake.app import create_app
    from tests.integration.test_intake_api import identification

    async with running(create_app(env, run_consumer=False, run_relay=False)) as client:
        a, b, c = [(await client.post("/v1/identifications", json=identification(), headers=police(env))).json()
                   for _ in range(3)]
        assert b["linked_case_id"] == c["linked_case_id"] == a["case_id"]
        intake = client._transport.app.state.deps  # type: ignore[attr-defined]
        conn = await asyncpg.connect(env.database_url)
        try:
            pseudonym = await conn.fetchval("select child_ref from intake.cases where case_id = $1",
                                            uuid.UUID(a["case_id"]))
            # rows as the previous release wrote them: the pseudonym on a's event, a link on b's
            for cid, link in ((a["case_id"], None), (b["case_id"], a["case_id"])):
                await conn.execute(
                    "update intake.outbox set envelope = jsonb_set(jsonb_set(envelope, '{data,child_ref}', "
                    "to_jsonb($2::text)), '{data,linked_case_id}', coalesce(to_jsonb($3::text), 'null'::jsonb)) "
                    "where key = $1", cid, pseudonym, link)
            actor = service.Actor(sub="ops", agency=ev.AgencyType.coordinator, municipality="*",
                                  roles=("operator",), channel="cli")
            await service.erase_case(intake, case_id=uuid.UUID(a["case_id"]), actor=actor)
            links = dict(await conn.fetch("select case_id::text, linked_case_id::text from intake.cases"))
            assert links == {a["case_id"]: None, b["case_id"]: None, c["case_id"]: b["case_id"]}
            rows = {r["key"]: orjson.loads(r["envelope"])["data"] for r in await conn.fetch(
                "select key, envelope from intake.outbox where event_type = 'case.identified'")}
            assert rows[a["case_id"]]["child_ref"] == ERASED_CHILD_REF
            assert rows[b["case_id"]]["linked_case_id"] is None
            assert rows[b["case_id"]]["child_ref"] == pseudonym  # b is not erased: the same child, kept
            view = (await client.get(f"/v1/cases/{c['case_id']}", headers=police(env))).json()
            assert view["linked_case_id"] == b["case_id"] and view["repeat_identification"] is True
        finally:
            await conn.close()
