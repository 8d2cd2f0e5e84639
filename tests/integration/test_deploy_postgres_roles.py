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
