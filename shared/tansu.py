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
    """How long a consumer's fetch waits at the broker for data (KAFKA_FETCH_MAX_WAIT_MS overrides).

    Tansu does not wake a waiting fetch when data arrives: a consumer waits its whole
    fetch_max_wait_ms, so keep it short there (20 ms). Apache Kafka answers a waiting fetch as
    soon as data arrives, so the wait costs no latency there; it only sets how often an idle
    consumer asks again. 5 s instead of Kafka's 500 ms default: on a fresh stack the idle CPU
    was 0.059-0.065 core at 500 ms and 0.049-0.056 in five runs of the final tree (0.033 in one
    earlier run; the broker's share fell most; bench/README.md), and the alert latency at 10 and
    100 identifications/s did not change. What it costs: the broker
    answers one request per connection at a time, so an offset request on the fetch connection
    queues behind a waiting fetch. Hence faust workers poll briefly while they rebalance or
    recover tables (`shared.streams.tune_fetch_wait`), and tools reading a topic to its end
    always do (`shared.kafka.SHORT_FETCH_WAIT_MS`). A long poll already in flight when a
    rebalance begins still delays the first offset request after it: a takeover can take up to
    the wait longer (seen: a worker's recovery ending 4.7 s after the rebalance), and so can
    intake's plain consumer resuming. (faust losing records around a rebalance, seen at 1 s
    before, is fixed by `shared.streams.fix_rebalance_seek`.)"""
    return 20 if on_tansu(settings) else 5000


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
