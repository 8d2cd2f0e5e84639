"""Issue 15, item 5: master keys with key ids, re-wrapped online by `clms keys rotate`
(real PostgreSQL; intake's API in this process)."""

from __future__ import annotations

import asyncio
import base64
import os
import uuid

import asyncpg
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from services.intake import service
from services.intake.app import create_app
from services.intake.cli import keys_app
from services.intake.crypto import CaseCipher, DecryptionError
from tests.apps import running
from tests.integration.test_intake_api import identification, police

pytestmark = pytest.mark.integration

K1 = base64.urlsafe_b64encode(os.urandom(32)).decode()
K2 = base64.urlsafe_b64encode(os.urandom(32)).decode()


def with_keys(env, ring: str):
    return env.model_copy(update={"encryption_master_keys": SecretStr(ring)})


async def kids(env) -> dict[str, int]:
    conn = await asyncpg.connect(env.database_url)
    try:
        return {r["master_key_id"]: r["n"] for r in await conn.fetch(
            "select master_key_id, count(*) as n from intake.case_keys group by 1")}
    finally:
        await conn.close()


async def cli(env, *args: str):
    cli_env = {"DATABASE_URL": env.database_url, "KAFKA_BOOTSTRAP_SERVERS": env.kafka_bootstrap_servers,
               "ENCRYPTION_MASTER_KEYS": env.encryption_master_keys.get_secret_value()}
    return await asyncio.to_thread(CliRunner().invoke, keys_app, list(args), env=cli_env)


async def test_keys_rotate_rewraps_every_data_key_online_and_the_old_master_key_can_then_go(env):
    old = with_keys(env, f"2026-01:{K1}")
    async with running(create_app(old, run_consumer=False, run_relay=False)) as client:
        cases = [(await client.post("/v1/identifications", json=identification(), headers=police(old))).json()
                 for _ in range(5)]
    assert await kids(env) == {"2026-01": 5}
    conn = await asyncpg.connect(env.database_url)
    before = {r["case_id"]: r["wrapped_key"] for r in await conn.fetch("select * from intake.case_keys")}
    await conn.close()

    # with only the new key, the old cases do not open and `clms keys status` says why
    only_new = with_keys(env, f"2026-11:{K2}")
    status = await cli(only_new, "status")
    assert status.exit_code == 1 and "2026-01 (NOT CONFIGURED): 5" in status.output
    assert "add it back" in status.output

    # both keys, the new one last: new data keys go under it, old cases still read
    both = with_keys(env, f"2026-01:{K1},2026-11:{K2}")
    async with running(create_app(both, run_consumer=False, run_relay=False)) as client:
        newer = (await client.post("/v1/identifications", json=identification(), headers=police(both))).json()
        assert await kids(env) == {"2026-01": 5, "2026-11": 1}
        # online: reads go on while the rotation re-wraps one key per transaction
        intake = client._transport.app.state.deps  # type: ignore[attr-defined]
        reads = [client.get(f"/v1/cases/{c['case_id']}", headers=police(both)) for c in cases]
        rotation, *answers = await asyncio.gather(service.rotate_keys(intake.pool, intake.cipher, batch=1), *reads)
        assert all(a.status_code == 200 and a.json()["personal"]["given_name"] == "Arbër" for a in answers)
        assert rotation.rewrapped == 5 and rotation.by_kid == {"2026-11": 6}
    again = await cli(both, "rotate")
    assert again.exit_code == 0, again.output
    assert "re-wrapped 0 data key(s) under master key 2026-11" in again.output
    assert "older master keys can be removed" in again.output
    conn = await asyncpg.connect(env.database_url)
    after = {r["case_id"]: r["wrapped_key"] for r in await conn.fetch("select * from intake.case_keys")}
    await conn.close()
    assert all(after[cid] != before[cid] for cid in before)  # really re-wrapped, not relabelled

    # the old master key removed: every case still opens, with the same per-case token
    async with running(create_app(only_new, run_consumer=False, run_relay=False)) as client:
        for c in (*cases, newer):
            view = (await client.get(f"/v1/cases/{c['case_id']}", headers=police(only_new))).json()
            assert view["personal"]["family_name"] == "Krasniqi" and view["child_ref"] == c["child_ref"]
    assert (await cli(only_new, "status")).exit_code == 0
    # and the old key alone no longer opens anything
    with pytest.raises(DecryptionError):
        CaseCipher([("2026-01", base64.urlsafe_b64decode(K1))]).unwrap(
            uuid.UUID(cases[0]["case_id"]), after[uuid.UUID(cases[0]["case_id"])])
