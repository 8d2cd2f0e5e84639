"""Run a service's FastAPI app in the test's event loop, lifespan included (so its faust
worker, outbox relay and consumers really run against the real broker and database), and
talk to it over an httpx client bound to the app."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI

from shared.auth import mint_token
from shared.settings import Settings
from shared.web import monitoring_app


@contextlib.asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            yield client


async def scrape(app: FastAPI) -> str:
    """`GET /metrics` on the app's monitoring port (what Prometheus scrapes; the API port answers 404)."""
    transport = httpx.ASGITransport(app=monitoring_app(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://monitoring") as client:
        r = await client.get("/metrics")
        r.raise_for_status()
        return r.text


def bearer(settings: Settings, *, sub: str, agency: str, municipality: str, roles: list[str]) -> dict[str, str]:
    """Authorization header with a development token for the given subject."""
    token = mint_token(settings, sub=sub, agency=agency, municipality=municipality, roles=roles)
    return {"Authorization": f"Bearer {token}"}
