"""What each operator command prints: its sections (for people and pipes) and its JSON document
(for scripts), built from what the command found. Pure functions: no broker, no database.

The JSON field names are the table columns in snake_case; numbers are numbers, times ISO 8601
(UTC), and null means unknown (a topic that does not exist has no partitions, a group that has
committed nothing on a partition has no committed offset).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from clms.output import Column, Section


def ms_to_time(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def _utc(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _utc_ms(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _short_id(value: str | None) -> str:
    return (value or "")[:8]


# --- clms topics -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopicInfo:
    topic: str
    key: str
    partitions: int | None = None  # None: the topic does not exist
    end_offsets: tuple[int, ...] | None = None

    @property
    def exists(self) -> bool:
        return self.partitions is not None


def topics_report(bootstrap: str, topics: Sequence[TopicInfo]) -> tuple[list[Section], Any]:
    rows = [{
        "topic": t.topic, "exists": t.exists, "partitions": t.partitions,
        "end_offsets": list(t.end_offsets) if t.end_offsets is not None else None,
        "messages": sum(t.end_offsets) if t.end_offsets is not None else None, "key": t.key,
    } for t in topics]
    columns = [
        Column("topic", "topic"),
        Column("partitions", "partitions", text=lambda v: "missing" if v is None else str(v),
               style=lambda v: "red" if v is None else None),
        Column("end offsets", "end_offsets"),
        Column("messages", "messages"),
        Column("key", "key"),
    ]
    return [Section(f"topics on {bootstrap}", columns, rows)], rows


# --- clms lag ----------------------------------------------------------------------------------


def lag_report(lags: Iterable[Any]) -> tuple[list[Section], Any]:
    """`lags`: shared.kafka.PartitionLag rows."""
    rows = [{"group": r.group, "topic": r.topic, "partition": r.partition, "committed": r.committed,
             "end": r.end, "lag": r.lag} for r in lags]
    columns = [Column("group", "group"), Column("topic", "topic"), Column("partition", "partition"),
               Column("committed", "committed", short=_dash), Column("end", "end"), Column("lag", "lag")]
    return [Section("consumer lag", columns, rows)], rows


def lag_by_group_and_topic(lags: Iterable[Any]) -> list[dict[str, Any]]:
    totals: dict[tuple[str, str], int] = {}
    for r in lags:
        totals[(r.group, r.topic)] = totals.get((r.group, r.topic), 0) + r.lag
    return [{"group": g, "topic": t, "lag": n} for (g, t), n in sorted(totals.items())]


# --- clms trace --------------------------------------------------------------------------------


def trace_report(case_id: str, lines: Iterable[Any]) -> tuple[list[Section], Any]:
    """`lines`: clms.ops.TraceLine rows, in story order."""
    rows = [{
        "time": ln.time, "type": ln.type, "source": ln.source, "topic": ln.topic,
        "partition": ln.partition, "offset": ln.offset, "event_id": ln.event_id,
        "causation_id": ln.causation_id, "correlation_id": ln.correlation_id, "replayed": ln.replayed,
    } for ln in lines]
    columns = [
        Column("time", "time", text=_utc_ms),
        Column("event", "type"),
        Column("by (source)", "source"),
        Column("topic", "topic"),
        Column("event id", "event_id", short=_short_id),
        Column("caused by", "causation_id", short=_short_id),
    ]
    return [Section(f"case {case_id}", columns, rows)], {"case_id": case_id, "events": rows}


# --- clms dlq list -----------------------------------------------------------------------------


def dlq_report(letters: Sequence[Any], summaries: Iterable[Any], *, show: int = 0) -> tuple[list[Section], Any]:
    """`letters`: clms.ops.StoredDeadLetter (oldest first); `summaries`: clms.ops.ReasonSummary."""
    reasons = [{"reason": s.reason, "count": s.count, "oldest": ms_to_time(s.oldest_ms),
                "from_topics": sorted(s.topics)} for s in summaries]
    sections = [Section(f"dead letters ({len(letters)})", [
        Column("reason", "reason"), Column("count", "count"), Column("oldest", "oldest", text=_utc),
        Column("from topics", "from_topics", text=", ".join),
    ], reasons)]
    document: dict[str, Any] = {"total": len(letters), "reasons": reasons}
    if show:
        newest = [{
            "id": d.id, "time": ms_to_time(d.timestamp_ms), "event_id": d.event_id,
            "origin_topic": d.letter.topic or None,
            "origin_partition": d.letter.partition if d.letter.partition >= 0 else None,
            "origin_offset": d.letter.offset if d.letter.offset >= 0 else None,
            "group": d.letter.group or None, "reason": d.letter.reason or None, "error": d.letter.error,
        } for d in letters[-show:]]
        sections.append(Section(f"newest {show}", [
            Column("id", "id"), Column("time", "time", text=_utc),
            Column("origin topic", "origin_topic"), Column("partition", "origin_partition"),
            Column("offset", "origin_offset"), Column("group", "group"), Column("reason", "reason"),
            Column("error", "error", short=lambda v: (v or "")[:120]),
        ], newest))
        document["newest"] = newest
    return sections, document


# --- clms status -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceHealth:
    service: str
    url: str
    state: str  # ready | not ready | down
    checks: dict[str, str] | None = None  # the /readyz checks, when it answered
    error: str | None = None  # why it did not answer


@dataclass(frozen=True)
class OutboxBacklog:
    schema: str
    rows: int | None = None
    oldest_age_s: float | None = None
    error: str | None = None  # "no schema yet", "unreachable (...)"


STATE_STYLE = {"ready": "green", "not ready": "yellow", "down": "red"}


def status_report(health: Sequence[ServiceHealth], lags: Iterable[Any], dead_letter_count: int | None,
                  backlog: Sequence[OutboxBacklog]) -> tuple[list[Section], Any]:
    services = []
    for h in health:
        failing = {k: v for k, v in (h.checks or {}).items() if v != "ok"}
        detail = ", ".join(f"{k}: {v}" for k, v in failing.items()) or h.error
        services.append({"service": h.service, "url": h.url, "state": h.state, "detail": detail or None,
                         "checks": h.checks})
    lag = lag_by_group_and_topic(lags)
    outbox = [{"schema": b.schema, "rows": b.rows, "oldest_age_s": b.oldest_age_s, "error": b.error}
              for b in backlog]
    sections = [
        Section("services", [Column("service", "service"), Column("url", "url"),
                             Column("state", "state", style=lambda v: STATE_STYLE.get(v)),
                             Column("detail", "detail")], services),
        Section("consumer lag", [Column("group", "group"), Column("topic", "topic"), Column("lag", "lag")], lag),
        Section("dead letters", [Column("dead letters", "count")], [{"count": dead_letter_count}]),
        Section("outbox backlog", [
            Column("schema", "schema"), Column("unpublished rows", "rows"),
            Column("oldest age (s)", "oldest_age_s", text=lambda v: "" if v is None else f"{v:.1f}"),
            Column("error", "error")], outbox),
    ]
    document = {"services": services, "consumer_lag": lag, "dead_letters": dead_letter_count, "outbox": outbox}
    return sections, document
