"""How every service process starts: `python -m services.<name>` calls `serve(name, create_app)`.

One composition root per service (`create_app(settings) -> FastAPI`); the app's lifespan
starts and stops everything else the service runs in the same process (its faust worker, its
outbox relay, its consumers). Nothing does I/O at import.
"""

from __future__ import annotations

import asyncio
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
    app = create_app(settings)
    common = dict(log_config=None,  # structlog owns logging (no personal data, JSON lines)
                  access_log=False)  # paths carry case ids only, but one log format is easier to scan
    api = QuietServer(uvicorn.Config(app, host=settings.host, port=getattr(settings, f"{name}_port"),
                                     timeout_graceful_shutdown=10, **common))
    mport = settings.metrics_port_for(name)
    monitoring = QuietServer(uvicorn.Config(
        monitoring_app(app), host=settings.metrics_host or settings.host, port=mport, lifespan="off",
        **common)) if mport else None
    # uvloop (libuv) instead of asyncio's selector loop: the same program, less CPU per socket
    # read and write and per wake-up from another thread (intake spent a tenth of its time in
    # the selector transport's write); uvicorn picks it the same way from its command line.
    # The policy, not only this loop: faust's consumer thread makes its own loop from it.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(_serve(api, monitoring))


class QuietServer(uvicorn.Server):
    """uvicorn's server, waking once a second rather than ten times when nothing happens (its
    tick refreshes the Date header, which has a one-second resolution anyway, and looks for a
    stop request); a signal or `stop()` wakes it at once. Ten ticks a second in each of the two
    servers of six processes were most of an idle stack's Python CPU (bench/README.md, idle)."""

    TICK_S = 1.0

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
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
