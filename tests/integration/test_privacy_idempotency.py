"""Idempotency rows are not a dictionary attack (issue 15, item 4), on the real intake service and
the real PostgreSQL: a row dumped from `intake.idempotency_keys` cannot be matched by hashing a
guessed identification (unkeyed SHA-256 of the body, as it was stored before), only by the HMAC
under IDEMPOTENCY_HMAC_KEY; and rows older than the retention window are purged by intake's
background task while newer ones stay."""

from __future__ import annotations

import hashlib
import hmac

import asyncpg
import pytest

from services.intake.app import create_app
from services.intake.models import IdentificationRequest
from tests.apps import running
from tests.infra import wait_until
from tests.integration.test_intake_api import identification, police

pytestmark = pytest.mark.integration


async def test_a_dumped_idempotency_row_cannot_be_matched_without_the_key(env):
    body = identification()
    async with running(create_app(env, run_consumer=False, run_relay=False)) as client:
        r = await client.post("/v1/identifications", json=body, headers={**police(env), "Idempotency-Key": "k-1"})
        assert r.status_code == 201, r.text
        # the retry still gets the first answer (the keyed hash is stable)
        again = await client.post("/v1/identifications", json=body, headers={**police(env), "Idempotency-Key": "k-1"})
        assert again.headers.get("idempotent-replayed") == "true"

    conn = await asyncpg.connect(env.database_url)
    try:  # what a database dump gives an attacker
        (row,) = await conn.fetch("select request_hash from intake.idempotency_keys")
    finally:
        await conn.close()
    dumped = row["request_hash"]

    # The attacker guesses names (the right one among them) and hashes each candidate body the way
    # the body is serialised: without the key, no guess matches, the right one included.
    guesses = ["Besnik", "Arbër", "Drita", "Blerim"]
    for given in guesses:
        candidate = identification(child={**body["child"], "given_name": given})
        serialised = IdentificationRequest.model_validate(candidate).model_dump_json().encode()
        assert hashlib.sha256(serialised).hexdigest() != dumped
    # With the key (which only intake holds) the right guess matches: the hash is an HMAC of the body.
    key = env.idempotency_hmac_key.get_secret_value().encode()
    right = IdentificationRequest.model_validate(body).model_dump_json().encode()
    assert hmac.new(key, right, hashlib.sha256).hexdigest() == dumped
    wrong = IdentificationRequest.model_validate(
        identification(child={**body["child"], "given_name": "Besnik"})).model_dump_json().encode()
    assert hmac.new(key, wrong, hashlib.sha256).hexdigest() != dumped


async def test_idempotency_rows_older_than_the_window_are_purged_in_batches(env):
    settings = env.model_copy(update={"idempotency_retention_h": 48.0, "idempotency_purge_every_s": 0.2,
                                      "idempotency_purge_batch": 2})
    async with running(create_app(settings, run_consumer=False, run_relay=False)) as client:
        for i in range(5):
            r = await client.post("/v1/identifications", json=identification(notes=f"child {i}"),
                                  headers={**police(env), "Idempotency-Key": f"old-{i}"})
            assert r.status_code == 201, r.text
        r = await client.post("/v1/identifications", json=identification(notes="recent"),
                              headers={**police(env), "Idempotency-Key": "recent"})
        assert r.status_code == 201
        conn = await asyncpg.connect(env.database_url)
        try:
            # five rows from three days ago (more than one batch), one from an hour ago
            await conn.execute("update intake.idempotency_keys set created_at = now() - interval '72 hours' "
                               "where key like 'old-%'")
            await conn.execute("update intake.idempotency_keys set created_at = now() - interval '1 hour' "
                               "where key = 'recent'")

            async def purged():
                keys = [r["key"] for r in await conn.fetch("select key from intake.idempotency_keys")]
                return keys if keys == ["recent"] else None
            assert await wait_until(purged, timeout_s=15, what="old idempotency rows purged") == ["recent"]
            # the cases themselves stay: only the retry memory is forgotten
            assert await conn.fetchval("select count(*) from intake.cases") == 6
        finally:
            await conn.close()
        # a retry within the window still replays; after the purge an old key is simply new again
        r = await client.post("/v1/identifications", json=identification(notes="recent"),
                              headers={**police(env), "Idempotency-Key": "recent"})
        assert r.headers.get("idempotent-replayed") == "true"
