"""How every service process starts: `python -m services.<name>` calls `serve(name, create_app)`.

One composition root per service (`create_app(settings) -> FastAPI`); the app's lifespan
starts and stops everything else the service runs in the same process (its faust worker, its
outbox relay, its consumers). Nothing does I/O at import.
"""

from __future__ import annotations

from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from shared.logs import configure_logging
from shared.settings import Settings


def serve(name: str, create_app: Callable[[Settings], FastAPI], settings: Settings | None = None) -> None:
    settings = settings or Settings()
    configure_logging(name, level=settings.log_level, json=settings.log_json)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=getattr(settings, f"{name}_port"),
        log_config=None,  # structlog owns logging (no personal data, JSON lines)
        access_log=False,  # paths carry case ids only, but one log format is easier to scan
        timeout_graceful_shutdown=10,
    )
