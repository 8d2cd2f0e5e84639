"""deploy/postgres/roles.sql on a real PostgreSQL: each service role migrates its own schema
with the real migration runner and cannot read or write another service's schema.

Runs on a private embedded PostgreSQL (pgserver) because roles are cluster-wide and must not
leak into the shared test cluster.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import asyncpg
import pytest

from shared.db import migrate

ROOT = Path(__file__).resolve().parents[2]
ROLES_SQL = ROOT / "deploy" / "postgres" / "roles.sql"
SERVICES_WITH_DB = ("intake", "referral", "notifications")

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pgserver = pytest.importorskip("pgserver")
    srv = pgserver.get_server(tmp_path_factory.mktemp("pgroles"), cleanup_mode="stop")
    srv.psql("create database clms;")
    psql = Path(pgserver.__file__).parent / "pginstall" / "bin" / "psql"
    args = [str(psql), srv.get_uri("clms"), "-v", "db=clms", "-f", str(ROLES_SQL)]
    for name in SERVICES_WITH_DB:
        args[2:2] = ["-v", f"{name}_password=pw-{name}", "-v", f"{name}_app_password=pw-{name}-app"]
    for _ in range(2):  # idempotent: a second run (password rotation) succeeds too
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    srv.roles_args = args
    yield srv
    srv.cleanup()


def role_dsn(srv, role: str) -> str:
    # pgserver listens on a unix socket in its data directory
    host = srv.get_uri("clms").split("host=")[1]
    return f"postgresql://{role}@/clms?host={host}"


async def test_each_role_migrates_its_own_schema_and_nothing_else(cluster):
    for name in SERVICES_WITH_DB:
        conn = await asyncpg.connect(role_dsn(cluster, name))
        try:
            applied = await migrate(conn, schema=name, folder=ROOT / "services" / name / "migrations")
            assert applied, f"{name}: no migration applied"
            owner = await conn.fetchval("select nspowner::regrole::text from pg_namespace where nspname=$1", name)
            assert owner == name
        finally:
            await conn.close()
    conn = await asyncpg.connect(role_dsn(cluster, "referral"))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("select * from intake.outbox limit 1")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("insert into notifications.outbox default values")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("alter schema intake rename to mine")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("create table public.sneaky (id int)")
    finally:
        await conn.close()


async def test_the_runtime_role_may_only_insert_into_the_audit_trail(cluster):
    """Issue 16 item 8: migrations run as the schema owner (`intake`); the service runs as
    `intake_app`, which reads and writes the case tables but can only add audit rows: it cannot
    update, delete or truncate them, drop the append-only trigger, or alter the table."""
    owner = await asyncpg.connect(role_dsn(cluster, "intake"))
    try:
        await migrate(owner, schema="intake", folder=ROOT / "services" / "intake" / "migrations")
    finally:
        await owner.close()
    # re-running roles.sql after the migrations (an upgrade, a password rotation) keeps it so
    done = subprocess.run(cluster.roles_args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    app = await asyncpg.connect(role_dsn(cluster, "intake_app"))
    try:
        await app.execute("insert into intake.audit(actor, actor_agency, actor_municipality, action, outcome, channel) "
                          "values ('police.prizren.duty', 'police', 'prizren', 'case.read', 'ok', 'http')")
        await app.execute("insert into intake.outbox(event_id, topic, key, event_type, envelope) "
                          "values (gen_random_uuid(), 'clms.case-events', 'k', 'case.identified', '{}')")
        await app.execute("update intake.outbox set published_at = now()")  # ordinary tables: read and write
        for statement in ("update intake.audit set actor = 'someone else'",
                          "delete from intake.audit",
                          "truncate intake.audit",
                          "select * from intake.audit",
                          "drop trigger audit_no_update_delete on intake.audit",
                          "alter table intake.audit disable trigger audit_no_update_delete",
                          "drop table intake.audit",
                          "create table intake.mine (id int)"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await app.execute(statement)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await migrate(app, schema="intake", folder=ROOT / "services" / "intake" / "migrations")
    finally:
        await app.close()
    owner = await asyncpg.connect(role_dsn(cluster, "intake"))
    try:
        assert await owner.fetchval("select count(*) from intake.audit") == 1
    finally:
        await owner.close()


async def _as(cluster, role: str):
    return await asyncpg.connect(role_dsn(cluster, role))


async def test_the_runtime_roles_may_only_add_to_the_history_tables(cluster):
    """The history tables are audit trails too: referral.referral_history (INSERT, and SELECT:
    the referral view shows it), notifications.delivery_attempts (INSERT only) and
    intake.case_events (INSERT, SELECT, and clearing note_ciphertext, which erasure does). The
    runtime role cannot update, delete or truncate their rows or drop their triggers, also after
    roles.sql is run again over the migrated schemas (an upgrade, a password rotation)."""
    for name in SERVICES_WITH_DB:
        owner = await _as(cluster, name)
        try:
            await migrate(owner, schema=name, folder=ROOT / "services" / name / "migrations")
        finally:
            await owner.close()
    done = subprocess.run(cluster.roles_args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

    async def refused(conn, *statements):
        for statement in statements:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)

    app = await _as(cluster, "referral_app")
    try:
        rid = await app.fetchval(
            """insert into referral.referral(referral_id, case_id, municipality, agency, office_id, priority,
                   rule_id, rule_version, legal_basis, age_band, sector, reported_by, source_event_id,
                   correlation_id, identified_at, deadline)
               values (gen_random_uuid(), gen_random_uuid(), 'prizren', 'csw', 'csw.prizren', 'high', 'r', 1,
                   'law', '10_14', 'begging', 'police.prizren.duty', gen_random_uuid(), 'c', now(), now())
               returning referral_id""")
        await app.execute("update referral.referral set status = 'acknowledged' where referral_id = $1", rid)
        await app.execute("insert into referral.referral_history(referral_id, actor, action, from_status, to_status) "
                          "values ($1, 'csw.prizren.duty', 'acknowledge', 'pending', 'acknowledged')", rid)
        assert await app.fetchval("select count(*) from referral.referral_history") == 1
        await refused(app, "update referral.referral_history set actor = 'someone else'",
                      "delete from referral.referral_history",
                      "truncate referral.referral_history",
                      "drop trigger referral_history_no_update_delete on referral.referral_history",
                      "alter table referral.referral_history disable trigger referral_history_no_update_delete",
                      "drop table referral.referral_history")
    finally:
        await app.close()

    app = await _as(cluster, "notifications_app")
    try:
        nid = await app.fetchval(
            """insert into notifications.notifications(notification_id, event_id, event_type, cause_event_type,
                   recipient, channel, language, subject, body, max_attempts, correlation_id)
               values (gen_random_uuid(), gen_random_uuid(), 'referral.created', 'referral.created',
                   'csw.prizren.duty', 'email', 'sq', 's', 'b', 3, 'c') returning notification_id""")
        for _ in range(2):  # the service's own statement: a repeated attempt row changes nothing
            await app.execute("insert into notifications.delivery_attempts(notification_id, attempt, ok, error) "
                              "values ($1, 1, false, 'timeout') on conflict do nothing", nid)
        await refused(app, "select * from notifications.delivery_attempts",
                      "update notifications.delivery_attempts set ok = true",
                      "delete from notifications.delivery_attempts",
                      "truncate notifications.delivery_attempts",
                      "drop trigger delivery_attempts_no_update_delete on notifications.delivery_attempts")
    finally:
        await app.close()

    app = await _as(cluster, "intake_app")
    try:
        cid = await app.fetchval(
            """insert into intake.cases(case_id, municipality, identified_on, report_source, reporter_agency,
                   reporter_municipality, reported_by, channel, age_at_identification, age_band,
                   compulsory_school_age, sex, community, school_status, sector, activity, hazardous,
                   worst_form, employer_involved)
               values (gen_random_uuid(), 'prizren', current_date, 'officer', 'police', 'prizren',
                   'police.prizren.duty', 'http', 12, '10_14', true, 'male', 'roma', 'dropped_out', 'begging',
                   'forced_begging', false, true, false) returning case_id""")
        await app.execute("insert into intake.case_events(event_id, case_id, event_type, actor, agency, "
                          "note_ciphertext) values (gen_random_uuid(), $1, 'case.closed', 'coordinator.prizren', "
                          "'coordinator', '\\x00'::bytea)", cid)
        assert await app.fetchval("select count(*) from intake.case_events") == 1
        # what `clms erase` does to the history: the encrypted note goes, the row stays
        await app.execute("update intake.case_events set note_ciphertext = null where case_id = $1", cid)
        await refused(app, "update intake.case_events set actor = 'someone else'",
                      "update intake.case_events set note_ciphertext = '\\x01'::bytea",
                      "delete from intake.case_events",
                      "truncate intake.case_events",
                      "drop trigger case_events_no_rewrite on intake.case_events")
    finally:
        await app.close()

    # development runs with one role (the owner): the triggers refuse it the same rewrites
    for role, statement in (("referral", "update referral.referral_history set actor = 'x'"),
                            ("referral", "delete from referral.referral_history"),
                            ("notifications", "truncate notifications.delivery_attempts"),
                            ("intake", "update intake.case_events set agency = 'x'"),
                            ("intake", "delete from intake.case_events")):
        owner = await _as(cluster, role)
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await owner.execute(statement)
        finally:
            await owner.close()
