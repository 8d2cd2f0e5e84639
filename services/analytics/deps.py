"""`Deps`: everything the analytics use cases, routes and worker need, built once in
`create_app` and handed to routes through `DepsDep` (views.py) and to the worker by
`build_worker(deps)`.

The service owns no database: its state is the in-memory `Aggregate` the worker keeps (summed
from the faust table of case states), the `Publisher` of the public snapshot, and the `Live`
signal the exact viewers' streams wait on. The faust worker itself starts with the app (its
lifespan) and is found in `Running`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from services.analytics.disclosure import Rules
from services.analytics.rules import Aggregate
from services.analytics.service import Live, Publisher
from shared.settings import Settings

if TYPE_CHECKING:
    from services.analytics.partials import PartialsReader
    from services.analytics.worker import Worker


@dataclass
class Running:
    """What the app's lifespan starts: the faust worker and the reader of every partition's
    partial counts while they run, else None."""

    worker: Worker | None = None
    reader: PartialsReader | None = None


@dataclass(frozen=True)
class Deps:
    settings: Settings
    aggregate: Aggregate  # the sum of every partition's partial (partials.py): what the API reads
    publisher: Publisher
    live: Live  # wakes the exact viewers' streams on every change (and on a publication)
    registry: CollectorRegistry
    stream_coalesce_s: float = 0.1  # an exact stream folds a burst of changes into one push
    running: Running = field(default_factory=Running)


def build_deps(settings: Settings, *, stream_coalesce_s: float = 0.1) -> Deps:
    rules = Rules(small=settings.analytics_small_count, base=settings.analytics_rounding_base,
                  breakdown_min=settings.analytics_breakdown_min)
    publisher = Publisher(rules=rules, every_s=settings.analytics_publish_every_s,
                          lag_s=settings.analytics_publish_lag_s)
    return Deps(settings=settings, aggregate=Aggregate(), publisher=publisher, live=Live(),
                registry=CollectorRegistry(), stream_coalesce_s=stream_coalesce_s)
