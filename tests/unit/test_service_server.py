"""The services' uvicorn server (`shared.service.QuietServer`) ticks once a second when idle, yet
a stop request ends it at once: the monitoring port's server is stopped this way after the API
server, and a slow stop would hold every service's shutdown."""

from __future__ import annotations

import asyncio
import time

import uvicorn
from fastapi import FastAPI

from shared.embedded import free_port
from shared.service import QuietServer


async def test_a_stop_request_ends_the_server_without_waiting_for_its_tick(monkeypatch):
    monkeypatch.setattr(QuietServer, "TICK_S", 60.0)  # a stop that waited for the tick would take a minute
    server = QuietServer(uvicorn.Config(FastAPI(), host="127.0.0.1", port=free_port(), lifespan="off",
                                        log_config=None))
    task = asyncio.create_task(server._serve())  # without uvicorn's own signal handlers, as _serve runs it
    while not server.started:
        assert not task.done(), task
        await asyncio.sleep(0.01)
    t = time.perf_counter()
    server.stop()
    await asyncio.wait_for(task, 10)
    assert time.perf_counter() - t < 5
