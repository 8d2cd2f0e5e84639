"""The services' uvicorn server (`shared.service.QuietServer`) ticks once a second when idle, yet
a stop request ends it at once: the monitoring port's server is stopped this way after the API
server, and a slow stop would hold every service's shutdown. Once started, a service settles
its heap (`settle_heap`: the garbage collector's full passes were intake's p99)."""

from __future__ import annotations

import asyncio
import gc
import time

import uvicorn
from fastapi import FastAPI

from shared.embedded import free_port
from shared.service import GC_GEN0_THRESHOLD, QuietServer, servers, settle_heap
from shared.settings import Settings


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


async def test_the_server_runs_its_after_startup_hook_once_it_has_started():
    seen: list[bool] = []
    server = QuietServer(uvicorn.Config(FastAPI(), host="127.0.0.1", port=free_port(), lifespan="off",
                                        log_config=None), after_startup=lambda: seen.append(server.started))
    task = asyncio.create_task(server._serve())
    try:
        async with asyncio.timeout(10):
            while not seen:
                assert not task.done(), task
                await asyncio.sleep(0.01)
        assert seen == [True]
    finally:
        server.stop()
        await asyncio.wait_for(task, 10)


def test_every_service_settles_its_heap_once_its_api_server_has_started():
    settings = Settings(_env_file=None, CLMS_ENV="test")
    api, monitoring = servers("intake", FastAPI(), settings)
    assert api.after_startup is settle_heap
    assert monitoring is None or monitoring.after_startup is None  # one process, one settle


def test_settling_the_heap_freezes_what_is_alive_and_lets_more_young_objects_gather():
    before = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_freeze_count() > 1000  # this test process's modules at least
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, before[1], before[2])
        assert GC_GEN0_THRESHOLD > before[0]
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
