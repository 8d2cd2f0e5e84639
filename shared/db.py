"""Postgres plumbing on asyncpg: a pool, and a migration runner for plain SQL files.

Each service owns one schema and a folder of versioned migrations
(`services/<name>/migrations/NNN_description.sql`); the tables every service has (outbox,
inbox) come from `shared/migrations/` and are applied into each service schema as the
`shared` series. The runner applies each file once, inside a transaction, under an advisory
lock (so replicas starting together do not race), and records it in
`<schema>.schema_migrations` with a checksum; a changed, already-applied file is an error.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from shared.settings import Settings

# Errors meaning "the database is away for now" (stopped, restarting, unreachable, a pooled
# connection cut mid-operation): the HTTP services answer 503 with Retry-After, the workers retry
# with backoff while the partition waits. `InternalClientError` is asyncpg's "cannot switch to
# state N; another operation is in progress" on a connection the server dropped mid-query; the
# pool terminates that connection on release (its reset fails), so a retry gets a fresh one.
DATABASE_UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, crash shutdown, cannot connect now
    asyncpg.exceptions.InternalClientError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)

_MIGRATION = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")


async def keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset when a connection comes back: nothing to send.

    asyncpg has already rolled back a transaction left open (and forgotten its client-side
    listeners) before it calls this. Its default reset would add a round trip per release
    (`pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`), paid by the service and by
    PostgreSQL on every acquire of every loop (bench/README.md, Performance). The services keep no
    other session state on pooled connections: no SET outside a transaction (`set local` only), no
    cursor outside a transaction, no LISTEN (the listeners connect on their own: notifications'
    `listen`), and the two session locks are released by their holders or their connection closed:
    the migration runner's (`migrate_service` closes the connection when a migration fails) and the
    outbox relay's (it closes the connection when it cannot unlock and unlisten: shared.outbox)."""


async def create_pool(settings: Settings, **overrides) -> asyncpg.Pool:
    kwargs = dict(
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        command_timeout=30,
        reset=keep_session,
    )
    kwargs.update(overrides)
    return await asyncpg.create_pool(settings.require_database(), **kwargs)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(folder: Path) -> list[Migration]:
    out = []
    for path in sorted(folder.glob("*.sql")):
        m = _MIGRATION.match(path.name)
        if not m:
            raise ValueError(
                f"migration file {path.name!r} does not match NNN_description.sql "
                "(three or more digits, lowercase description)"
            )
        out.append(Migration(int(m.group(1)), m.group(2), path.read_text(encoding="utf-8")))
    versions = [m.version for m in out]
    if len(versions) != len(set(versions)):
        raise ValueError(f"two migrations in {folder} share a version number")
    return out


class MigrationChecksumError(RuntimeError):
    pass


SHARED_MIGRATIONS = Path(__file__).parent / "migrations"


async def migrate(conn: asyncpg.Connection, *, schema: str, folder: Path) -> list[str]:
    """Apply pending migrations (the shared series, then the service's) to one service schema.

    Returns the applied migrations as `series:version` strings.
    """
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", schema):
        raise ValueError(f"schema name {schema!r} must be a lowercase SQL identifier")
    series = [("shared", m) for m in load_migrations(SHARED_MIGRATIONS)]
    series += [("service", m) for m in load_migrations(folder)]
    lock_key = int.from_bytes(hashlib.sha256(f"clms-migrate:{schema}".encode()).digest()[:8], "big", signed=True)
    applied_now: list[str] = []
    await conn.execute("select pg_advisory_lock($1)", lock_key)
    try:
        # Only create the schema when it is missing: `create schema if not exists` needs CREATE on
        # the database even when the schema exists, which a per-service role should not hold.
        if not await conn.fetchval("select 1 from pg_namespace where nspname = $1", schema):
            await conn.execute(f"create schema {schema}")
        await conn.execute(
            f"""create table if not exists {schema}.schema_migrations (
                    series text not null,
                    version integer not null,
                    name text not null,
                    checksum text not null,
                    applied_at timestamptz not null default now(),
                    primary key (series, version))"""
        )
        done = {
            (r["series"], r["version"]): r["checksum"]
            for r in await conn.fetch(f"select series, version, checksum from {schema}.schema_migrations")
        }
        for name, m in series:
            if (name, m.version) in done:
                if done[(name, m.version)] != m.checksum:
                    raise MigrationChecksumError(
                        f"migration {name}/{m.version:03d}_{m.name} of schema {schema} changed after it was "
                        "applied; add a new migration instead of editing an applied one"
                    )
                continue
            async with conn.transaction():
                await conn.execute(f"set local search_path to {schema}, public")
                await conn.execute(m.sql)
                await conn.execute(
                    f"insert into {schema}.schema_migrations(series, version, name, checksum) "
                    "values($1, $2, $3, $4)",
                    name, m.version, m.name, m.checksum,
                )
            applied_now.append(f"{name}:{m.version:03d}")
    finally:
        await conn.execute("select pg_advisory_unlock($1)", lock_key)
    return applied_now


async def migrate_url(url: str, *, schema: str, folder: Path) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        return await migrate(conn, schema=schema, folder=folder)
    finally:
        await conn.close()


async def migrate_service(settings: Settings, pool: asyncpg.Pool, *, schema: str, folder: Path) -> list[str]:
    """Apply a service's migrations at start: as the schema owner (DATABASE_MIGRATION_URL) when it
    is set, so the runtime role of DATABASE_URL never needs to create, alter or drop anything;
    else on the service's own pool (development: one role does both)."""
    if settings.database_migration_url:
        return await migrate_url(settings.database_migration_url, schema=schema, folder=folder)
    async with pool.acquire() as conn:
        try:
            return await migrate(conn, schema=schema, folder=folder)
        except BaseException:
            conn.terminate()  # it may still hold the migration lock: the pool skips the reset query
            raise
