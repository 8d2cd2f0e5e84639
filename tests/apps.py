"""Run a service's FastAPI app in the test's event loop, lifespan included (so its faust
worker, outbox relay and consumers really run against the real broker and database), and
talk to it over an httpx client bound to the app; or serve an app over real HTTP (uvicorn on
a free port) where a test needs a real socket (streaming responses, a client in a thread)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import httpx
import uvicorn
from fastapi import FastAPI

from shared.auth import mint_token
from shared.embedded import free_port
from shared.settings import Settings
from shared.web import monitoring_app

if TYPE_CHECKING:
    import faust


@contextlib.asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            yield client


@contextlib.asynccontextmanager
async def faust_running(app: "faust.App") -> AsyncIterator["faust.App"]:
    """A bare faust app (no FastAPI around it) started in the test's event loop, stopped after."""
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


@contextlib.asynccontextmanager
async def served(app: FastAPI, *, port: int | None = None) -> AsyncIterator[str]:
    """The app behind uvicorn in this event loop, its lifespan left to the caller (`running`);
    yields its base URL. Server-sent events need this: the in-process transport buffers."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off",
                                           log_config=None, access_log=False))
    task = asyncio.create_task(server.serve())
    deadline = asyncio.get_running_loop().time() + 10
    try:
        while not server.started:
            if task.done():  # it could not start (the port taken, ...): say why
                task.result()
                raise AssertionError(f"uvicorn on port {port} stopped before it started")
            assert asyncio.get_running_loop().time() < deadline, f"uvicorn on port {port} did not start in 10s"
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@contextlib.contextmanager
def served_in_thread(app: FastAPI, *, port: int, what: str, timeout_s: float = 15) -> Iterator[str]:
    """The app behind uvicorn in a thread of its own (lifespan included), for a server that
    synchronous code calls too (an identity provider, a key set); yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    try:
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, f"{what} did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


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
