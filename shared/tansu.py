"""Every workaround for the Java-less fallback broker (Tansu 0.6.0, memory engine), in one place.

Apache Kafka is the production broker and the one `make run` and `make test` start wherever a
JDK and Maven are present; none of these apply there. Each function below is called from
exactly the place that needs it, keyed off `CLMS_BROKER_KIND` (settings.kafka_broker_kind).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.settings import Settings


def on_tansu(settings: "Settings") -> bool:
    return settings.kafka_broker_kind == "tansu"


def fetch_max_wait_ms(settings: "Settings") -> int:
    """Tansu does not wake a waiting fetch when data arrives: a consumer waits its whole
    fetch_max_wait_ms, so keep it short there. Apache Kafka keeps its default (500 ms), which
    costs no latency because the broker answers as soon as data arrives. (1 s halved what idle
    consumers cost the broker, but with it a worker taking over partitions after a rebalance
    stopped folding part of them: tests/integration/test_analytics_scale_out.py failed 2 runs in
    2, and passed 3 in 3 at 500 ms. The cause was faust losing records around a rebalance, at
    500 ms too, more rarely; fixed by `shared.streams.fix_rebalance_seek`, after which the test
    passed 12 runs in 12 at 1 s. The longer wait's idle saving is not measured yet, so 500 ms
    stays.)"""
    return 20 if on_tansu(settings) else 500


def idempotence_supported(settings: "Settings") -> bool:
    """Tansu rejects InitProducerId v0, which aiokafka's idempotent producer sends."""
    return not on_tansu(settings)


def compression_type(settings: "Settings", wanted: str = "gzip") -> str | None:
    """Compressed record batches are not used with Tansu (not verified there; it serves
    development only): the records go uncompressed."""
    return None if on_tansu(settings) else wanted


def clamp_lag(settings: "Settings", end: int, committed: int | None) -> int:
    """Tansu under-reports a log end offset after multi-record batches (the last batch's base
    offset + 1), so end - committed can go negative there; on Apache Kafka lag is exact."""
    lag = end - (committed or 0)
    return max(0, lag) if on_tansu(settings) else lag


def changelog_batch_size(settings: "Settings") -> int | None:
    """faust table recovery trusts the log end offset, which Tansu under-reports after a
    multi-record batch: send a changelog one record per batch there (None = faust's default)."""
    return 1 if on_tansu(settings) else None
