"""How every service process starts: `python -m services.<name>` calls `serve(name, create_app)`.

One composition root per service (`create_app(settings) -> FastAPI`); the app's lifespan
starts and stops everything else the service runs in the same process (its faust worker, its
outbox relay, its consumers). Nothing does I/O at import.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

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
    api = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=getattr(settings, f"{name}_port"),
                                        timeout_graceful_shutdown=10, **common))
    mport = settings.metrics_port_for(name)
    monitoring = uvicorn.Server(uvicorn.Config(
        monitoring_app(app), host=settings.metrics_host or settings.host, port=mport, lifespan="off",
        **common)) if mport else None
    # uvloop (libuv) instead of asyncio's selector loop: the same program, less CPU per socket
    # read and write and per wake-up from another thread (intake spent a tenth of its time in
    # the selector transport's write); uvicorn picks it the same way from its command line.
    # The policy, not only this loop: faust's consumer thread makes its own loop from it.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(_serve(api, monitoring))


async def _serve(api: uvicorn.Server, monitoring: uvicorn.Server | None) -> None:
    # The API server owns the signal handlers (SIGINT/SIGTERM); the monitoring server runs
    # without its own (`_serve`) and stops when the API server has stopped.
    task = asyncio.create_task(monitoring._serve(), name="monitoring-port") if monitoring else None
    try:
        await api.serve()
    finally:
        if monitoring is not None and task is not None:
            monitoring.should_exit = True
            await task
