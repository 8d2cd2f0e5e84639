"""`Deps`: everything the notifications use cases need, built once by `app.create_app` (its
`deps` step) and handed to the routes through `DepsDep` and to the worker the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import asyncpg
from aiokafka import AIOKafkaProducer
from fastapi import Depends, Request
from prometheus_client import Counter, Gauge

from shared.outbox import OutboxRelay
from shared.settings import Settings
from shared.topics import Topics

if TYPE_CHECKING:
    from services.notifications.delivery import DeliveryLoop
    from services.notifications.service import AlertHub
    from services.notifications.worker import RealertLoop


@dataclass(frozen=True, slots=True)
class Metrics:
    deliveries: Counter  # clms_notifications_deliveries_total{outcome,channel}
    alerts: Counter  # clms_notifications_inbox_alerts_total
    sse_clients: Gauge  # clms_notifications_sse_clients


@dataclass(frozen=True, slots=True)
class Deps:
    pool: asyncpg.Pool
    settings: Settings
    topics: Topics
    producer: AIOKafkaProducer  # the relay's and the dead letters'
    relay: OutboxRelay  # woken after each commit that wrote outbox rows
    hub: AlertHub  # this replica's SSE subscribers
    metrics: Metrics
    delivery: DeliveryLoop | None  # None: e-mail/SMS go out from their own process (delivery.py)
    realerts: RealertLoop  # rung after each commit: a new referral's re-alert may fall due first


def get_deps(request: Request) -> Deps:
    return request.app.state.deps


DepsDep = Annotated[Deps, Depends(get_deps)]
