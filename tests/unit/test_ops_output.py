"""How the operator commands print: whole cells when piped, one JSON document with --json, and
exact consumer lag (the Tansu clamp only where the broker is Tansu)."""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone

import pytest
from rich.console import Console

from clms.output import Column, Section, emit, render_json, render_plain, render_rich
from clms.reports import TopicInfo, lag_report, status_report, topics_report, ServiceHealth, OutboxBacklog
from shared.kafka import PartitionLag, partition_lag
from shared.settings import Settings

LONG = "t0123456789abcdef.clms.agency-inbound"


def _lag(settings: Settings, group: str, topic: str, partition: int, committed: int | None, end: int) -> PartitionLag:
    return PartitionLag(group, topic, partition, committed, end,
                        partition_lag(settings, end=end, committed=committed))


def test_piped_output_is_tab_separated_with_every_cell_whole():
    name = LONG + ".with-a-much-longer-suffix-than-any-terminal-is-wide-" + "x" * 120
    sections, _ = topics_report("127.0.0.1:9092", [TopicInfo(name, "case id", 6, (1, 2, 3, 0, 0, 0)),
                                                   TopicInfo("t.clms.dead-letters", "original key")])
    text = render_plain(sections)
    lines = text.splitlines()
    assert lines[0].split("\t") == ["topic", "partitions", "end offsets", "messages", "key"]
    assert lines[1].split("\t") == [name, "6", "1 2 3 0 0 0", "6", "case id"]
    assert lines[2].split("\t") == ["t.clms.dead-letters", "missing", "", "", "original key"]
    assert "…" not in text and "\x1b" not in text  # no ellipsis, no colour codes


def test_a_tab_or_newline_inside_a_cell_cannot_split_it():
    sections = [Section("s", [Column("error", "error"), Column("n", "n")],
                        [{"error": "line one\nline\ttwo", "n": 1}])]
    assert render_plain(sections).splitlines()[1].split("\t") == ["line one line two", "1"]


def test_several_sections_are_titled_and_separated_by_a_blank_line():
    sections, _ = status_report(
        [ServiceHealth("intake", "http://127.0.0.1:8001", "down", error="ConnectError")],
        [_lag(Settings(_env_file=None), "g", LONG, 0, 1, 3)], 2,
        [OutboxBacklog("intake", error="no schema yet")])
    text = render_plain(sections)
    assert text.startswith("# services\nservice\turl\tstate\tdetail\n")
    assert "\n\n# consumer lag\ngroup\ttopic\tlag\ng\t" + LONG + "\t2\n" in text
    assert "# dead letters\ndead letters\n2\n" in text


def test_json_keeps_numbers_as_numbers_and_null_where_unknown():
    settings = Settings(_env_file=None)
    _, document = lag_report([_lag(settings, "g", LONG, 0, None, 4), _lag(settings, "g", LONG, 1, 7, 9)])
    parsed = json.loads(render_json(document))
    assert parsed == [
        {"group": "g", "topic": LONG, "partition": 0, "committed": None, "end": 4, "lag": 4},
        {"group": "g", "topic": LONG, "partition": 1, "committed": 7, "end": 9, "lag": 2},
    ]
    _, topics = topics_report("b", [TopicInfo(LONG, "case id")])
    assert json.loads(render_json(topics)) == [{"topic": LONG, "exists": False, "partitions": None,
                                                "end_offsets": None, "messages": None, "key": "case id"}]


def test_json_writes_times_as_iso_8601():
    when = datetime(2026, 11, 29, 18, 0, 1, 250000, tzinfo=timezone.utc)
    assert json.loads(render_json({"time": when, "topics": {"b", "a"}})) == {
        "time": "2026-11-29T18:00:01.250000+00:00", "topics": ["a", "b"]}


def test_on_a_terminal_a_table_with_unknown_shown_as_a_dash():
    sections, _ = lag_report([_lag(Settings(_env_file=None), "g", "t.clms.case-events", 0, None, 4)])
    out = io.StringIO()
    render_rich(sections, Console(file=out, width=200, force_terminal=True, color_system=None))
    row = next(ln for ln in out.getvalue().splitlines() if "t.clms.case-events" in ln)
    assert [c.strip() for c in row.strip("│ ").split("│")] == ["g", "t.clms.case-events", "0", "-", "4", "4"]


def test_emit_prints_plain_values_when_stdout_is_not_a_terminal(capsys):
    sections, document = lag_report([_lag(Settings(_env_file=None), "g", LONG, 0, 1, 3)])
    emit(sections, document=document)
    assert capsys.readouterr().out == f"group\ttopic\tpartition\tcommitted\tend\tlag\ng\t{LONG}\t0\t1\t3\t2\n"
    emit(sections, document=document, as_json=True)
    assert json.loads(capsys.readouterr().out)[0]["lag"] == 2


@pytest.mark.parametrize(("kind", "expected"), [("kafka", -1), ("tansu", 0)])
def test_lag_is_exact_on_kafka_and_clamped_only_on_tansu(kind, expected):
    settings = Settings(_env_file=None, CLMS_BROKER_KIND=kind)
    # "committed 6, end 5": the Tansu 0.6.0 under-report after multi-record batches
    assert partition_lag(settings, end=5, committed=6) == expected
    assert partition_lag(settings, end=9, committed=6) == 3
    assert partition_lag(settings, end=4, committed=None) == 4


def test_the_broker_kind_defaults_to_kafka():
    assert Settings(_env_file=None).kafka_broker_kind == "kafka"
