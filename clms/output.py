"""How the operator commands print what they found, for people and for scripts.

A command builds `Section`s (a title, columns and rows of plain values) once, and then:

- on a terminal: rich tables, as wide as the terminal (long ids may be shortened for reading);
- piped or redirected (stdout is not a terminal): tab-separated values with a header line, every
  cell whole (never cut, never ellipsized, no colour), so `grep`, `cut -f` and `awk -F'\\t'` work;
  a command with several sections puts a `# title` line before each and a blank line between;
- with `--json`: one JSON document (`render_json`), numbers as numbers and null where unknown.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

import orjson
from rich.console import Console
from rich.markup import escape
from rich.table import Table


@dataclass(frozen=True)
class Column:
    header: str
    key: str  # the row field shown in this column
    text: Callable[[Any], str] | None = None  # value -> cell text (default: str, "" for None)
    short: Callable[[Any], str] | None = None  # value -> shorter text, on a terminal only
    style: Callable[[Any], str | None] | None = None  # value -> rich style, on a terminal only


@dataclass
class Section:
    title: str
    columns: Sequence[Column]
    rows: list[dict[str, Any]] = field(default_factory=list)


def cell(value: Any) -> str:
    """A value as plain text: None is empty, lists are space-separated, times are ISO 8601."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (list, tuple, set, frozenset)):
        return " ".join(cell(v) for v in value)
    return str(value)


def _text(col: Column, row: dict[str, Any]) -> str:
    value = row.get(col.key)
    return col.text(value) if col.text else cell(value)


def _tsv_safe(text: str) -> str:
    # a tab or a newline inside a cell would split it; nothing else is changed
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def render_plain(sections: Sequence[Section]) -> str:
    """Tab-separated values, every cell whole (for pipes, files and scripts)."""
    out: list[str] = []
    titled = len(sections) > 1
    for i, s in enumerate(sections):
        if i:
            out.append("")
        if titled:
            out.append(f"# {s.title}")
        out.append("\t".join(c.header for c in s.columns))
        for row in s.rows:
            out.append("\t".join(_tsv_safe(_text(c, row)) for c in s.columns))
    return "\n".join(out) + "\n"


def render_rich(sections: Sequence[Section], console: Console) -> None:
    for s in sections:
        table = Table(title=s.title)
        for c in s.columns:
            table.add_column(c.header, overflow="fold")
        for row in s.rows:
            cells = []
            for c in s.columns:
                value = row.get(c.key)
                text = escape(c.short(value) if c.short else _text(c, row))
                style = c.style(value) if c.style else None
                cells.append(f"[{style}]{text}[/]" if style else text)
            table.add_row(*cells)
        console.print(table)


def _default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def render_json(document: Any) -> str:
    """One JSON document (datetimes as ISO 8601, sets as sorted lists)."""
    return orjson.dumps(document, default=_default, option=orjson.OPT_INDENT_2).decode() + "\n"


def stdout_is_terminal(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stdout
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def emit(sections: Sequence[Section], *, document: Any = None, as_json: bool = False,
         console: Console | None = None) -> None:
    """Print sections the way the reader needs them (see the module docstring)."""
    if as_json:
        sys.stdout.write(render_json(document))
    elif stdout_is_terminal():
        render_rich(sections, console or Console())
    else:
        sys.stdout.write(render_plain(sections))
    sys.stdout.flush()
