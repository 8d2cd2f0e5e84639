"""How every service process starts: `python -m services.<name>` calls `serve(name, create_app)`.

One composition root per service (`create_app(settings) -> FastAPI`); the app's lifespan
starts and stops everything else the service runs in the same process (its faust worker, its
outbox relay, its consumers). Nothing does I/O at import.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from types import FrameType

import uvicorn
import uvloop
from fastapi import FastAPI

from shared.logs import configure_logging
from shared.settings import Settings
from shared.web import monitoring_app


def serve(name: str, create_app: Callable[[Settings], FastAPI], settings: Settings | None = None) -> None:
    """Run the API on `<name>_port` and, unless `<NAME>_METRICS_PORT=0`, `/metrics` on the
    monitoring port (`Settings.metrics_port_for`) in the same process and event loop."""
    settings = settings or Settings()
    configure_logging(name, level=settings.log_level, json=settings.log_json)
    api, monitoring = servers(name, create_app(settings), settings)
    # uvloop (libuv) instead of asyncio's selector loop: the same program, less CPU per socket
    # read and write and per wake-up from another thread (intake spent a tenth of its time in
    # the selector transport's write); uvicorn picks it the same way from its command line.
    # The policy, not only this loop: faust's consumer thread makes its own loop from it.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(_serve(api, monitoring))


def servers(name: str, app: FastAPI, settings: Settings) -> tuple[QuietServer, QuietServer | None]:
    """The API server (its heap settled once started: `settle_heap`) and the monitoring port's."""
    common = dict(log_config=None,  # structlog owns logging (no personal data, JSON lines)
                  access_log=False)  # paths carry case ids only, but one log format is easier to scan
    api = QuietServer(uvicorn.Config(app, host=settings.host, port=getattr(settings, f"{name}_port"),
                                     timeout_graceful_shutdown=10, **common), after_startup=settle_heap)
    mport = settings.metrics_port_for(name)
    monitoring = QuietServer(uvicorn.Config(
        monitoring_app(app), host=settings.metrics_host or settings.host, port=mport, lifespan="off",
        **common)) if mport else None
    return api, monitoring


# Young objects the cyclic garbage collector lets pile up before a pass (Python's default: 700).
GC_GEN0_THRESHOLD = 10_000


def settle_heap() -> None:
    """Once a service has started: collect, then freeze what is alive (modules, classes, the
    app, its pools and schemas: ~125,000 objects in intake) out of the cyclic collector's reach,
    and let 10,000 young objects gather before a pass instead of 700. A request's garbage is
    acyclic and freed on the spot either way; what changes is that a full pass (about one a
    second under load, ~37 ms each, every request in flight waiting) no longer walks the whole
    startup heap, and young passes come 14 times less often. Measured in intake at 32 clients
    (`bench.intake`, 15 s): the collector's time over the process's life 1.28 -> 0.12 s; the
    bench's three rounds, back to back on one host: p99 85 -> 56 ms, 1,008 -> 1,144 requests/s,
    server CPU 0.95 -> 0.82 ms per request (bench/README.md). The cost: a cycle among the frozen
    objects is never collected (they live as long as the process anyway)."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


class QuietServer(uvicorn.Server):
    """uvicorn's server, waking once a second rather than ten times when nothing happens (its
    tick refreshes the Date header, which has a one-second resolution anyway, and looks for a
    stop request); a signal or `stop()` wakes it at once. Ten ticks a second in each of the two
    servers of six processes were most of an idle stack's Python CPU (bench/README.md, idle)."""

    TICK_S = 1.0

    def __init__(self, config: uvicorn.Config, *, after_startup: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.after_startup = after_startup  # called once the server has started (its lifespan ran)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._woken: asyncio.Event | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._wake()

    def stop(self) -> None:
        self.should_exit = True
        self._wake()

    def _wake(self) -> None:
        if self._loop is not None and self._woken is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._woken.set)

    async def main_loop(self) -> None:
        self._loop, self._woken = asyncio.get_running_loop(), asyncio.Event()
        if self.after_startup is not None:
            self.after_startup()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 10) % 864000  # every tick is a whole second: on_tick's "% 10 == 0"
            try:
                await asyncio.wait_for(self._woken.wait(), self.TICK_S)
            except TimeoutError:
                pass
            should_exit = await self.on_tick(counter)


async def _serve(api: QuietServer, monitoring: QuietServer | None) -> None:
    # The API server owns the signal handlers (SIGINT/SIGTERM); the monitoring server runs
    # without its own (`_serve`) and stops when the API server has stopped.
    task = asyncio.create_task(monitoring._serve(), name="monitoring-port") if monitoring else None
    try:
        await api.serve()
    finally:
        if monitoring is not None and task is not None:
            monitoring.stop()
            await task
