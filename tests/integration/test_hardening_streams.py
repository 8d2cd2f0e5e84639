"""Issue 16 item 4 (live streams) and item 8 (no development roster in production), on the real
notifications service (real broker, real PostgreSQL, a real HTTP server for SSE)."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx
import pytest

from services.notifications import service
from services.notifications.app import create_app
from shared.auth import mint_token
from shared.db import migrate
from shared.settings import Environment
from tests.apps import running, served
from tests.infra import wait_until

pytestmark = pytest.mark.integration

DUTY = dict(sub="csw.prizren.duty", agency="csw", municipality="prizren", roles=["duty_officer"])


async def events_of(response: httpx.Response) -> list[str]:
    """Every `event:` name until the server ends the stream."""
    names = []
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            names.append(line.partition(":")[2].strip())
    return names


async def test_inbox_streams_end_when_the_token_expires_take_one_time_tickets_and_are_capped(env):
    settings = env.model_copy(update={"sse_max_per_user": 2})
    app = create_app(settings)
    async with running(app), served(app) as base, httpx.AsyncClient(base_url=base, timeout=20) as http:
        # a stream opened with a 3-second token ends when the token expires
        short = mint_token(settings, **DUTY, ttl_s=3)
        opened = time.monotonic()
        async with http.stream("GET", "/v1/inbox/stream", headers={"Authorization": f"Bearer {short}"}) as r:
            assert r.status_code == 200
            names = await asyncio.wait_for(events_of(r), 15)
        lasted = time.monotonic() - opened
        assert names[0] == "ready" and names[-1] == "expired", names
        assert 1.5 <= lasted <= 10, f"the stream lasted {lasted:.1f}s for a 3-second token"

        # a token in the URL is refused; a one-time ticket from POST .../ticket works once
        token = mint_token(settings, **DUTY, ttl_s=600)
        refused = await http.get(f"/v1/inbox/stream?access_token={token}")
        assert refused.status_code == 400 and "token in the URL is refused" in refused.json()["detail"]
        assert (await http.get("/v1/inbox/stream")).status_code == 401
        ticket = (await http.post("/v1/inbox/stream/ticket", headers={"Authorization": f"Bearer {token}"})).json()
        assert 0 < ticket["expires_in"] <= 30
        async with http.stream("GET", ticket["url"]) as first:
            assert first.status_code == 200
            lines = first.aiter_lines()
            assert await asyncio.wait_for(anext(lines), 10) == "event: ready"
            again = await http.get(ticket["url"])
            assert again.status_code == 401 and "already used" in again.json()["detail"]

            # at most SSE_MAX_PER_USER (2 here) open streams per user
            async with http.stream("GET", "/v1/inbox/stream", headers={"Authorization": f"Bearer {token}"}) as second:
                assert second.status_code == 200
                third = await http.get("/v1/inbox/stream", headers={"Authorization": f"Bearer {token}"})
                assert third.status_code == 429 and "SSE_MAX_PER_USER" in third.json()["detail"]
                other = mint_token(settings, **{**DUTY, "sub": "csw.prizren.supervisor"}, ttl_s=600)
                async with http.stream("GET", "/v1/inbox/stream", headers={"Authorization": f"Bearer {other}"}) as o:
                    assert o.status_code == 200  # another user is not affected
        # closed streams give their slots back
        await wait_until(lambda: not app.state.guard._streams.get(DUTY["sub"]), timeout_s=10,
                         what="stream slots released")


async def test_the_development_roster_is_never_seeded_in_production(env):
    conn = await asyncpg.connect(env.require_database())
    try:
        await migrate(conn, schema=service.SCHEMA, folder=service.MIGRATIONS)
        production = env.model_copy(update={"environment": Environment.production})
        assert await service.seed_development_roster(conn, settings=production) == 0
        assert await conn.fetchval(f"select count(*) from {service.SCHEMA}.officers") == 0
        assert await service.seed_development_roster(conn, settings=env) > 0
    finally:
        await conn.close()
