"""What intake's use cases need, built once by the composition root (`app.create_app`) and handed
to the routes through `views.DepsDep` and to the consumer (`worker.IntakeConsumer`) the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import asyncpg

from shared.settings import Settings
from services.intake.crypto import CaseCipher
from services.intake.inbound import InboundGate

SCHEMA = "intake"


@dataclass(frozen=True)
class Deps:
    pool: asyncpg.Pool
    settings: Settings
    cipher: CaseCipher
    child_ref_key: bytes
    idempotency_key: bytes = b""  # keys request_hash (IDEMPOTENCY_HMAC_KEY)
    inbound: InboundGate | None = None  # clms.agency-inbound: sender keys and intake's JWE key
    schema: str = SCHEMA
    on_commit: Callable[[], None] = field(default=lambda: None)  # wakes the outbox relay

    @classmethod
    def build(cls, *, pool: asyncpg.Pool, settings: Settings, **kw: Any) -> "Deps":
        return cls(
            pool=pool,
            settings=settings,
            cipher=CaseCipher.from_settings(settings),
            child_ref_key=settings.child_ref_key.get_secret_value().encode(),
            idempotency_key=settings.idempotency_hmac_key.get_secret_value().encode(),
            inbound=kw.pop("inbound", None) or InboundGate.build(settings),
            **kw,
        )
