"""Query results as text: an aligned table for people, JSON lines or CSV for programs.

Kept apart from the query command so named forensic queries (issue 5) print
the same way. Input: column names and rows (tuples), as clickhouse-connect's
`QueryResult.column_names` / `.result_rows` give them.
"""

from __future__ import annotations

import csv
import datetime as _dt
import decimal
import ipaddress
import json
import uuid
from typing import IO, Iterable, Sequence

FORMATS = ("table", "json", "csv")


def _jsonable(v):
    if isinstance(v, _dt.datetime):
        # ClickHouse DateTime64(9) comes back with microseconds at best; ISO 8601 in UTC.
        if v.tzinfo is None:
            v = v.replace(tzinfo=_dt.timezone.utc)
        return v.isoformat()
    if isinstance(v, _dt.date):
        return v.isoformat()
    if isinstance(v, (uuid.UUID, ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(v)
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def _cell(v) -> str:
    if v is None:
        return "NULL"
    v = _jsonable(v)
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v).replace("\n", "\\n").replace("\t", "\\t")


def write_table(out: IO[str], columns: Sequence[str], rows: Iterable[Sequence], max_width: int = 80) -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(c) for c in columns]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = min(max(widths[i], len(c)), max_width)

    def fmt(values, numeric):
        parts = []
        for i, v in enumerate(values):
            if len(v) > widths[i]:
                v = v[: widths[i] - 1] + "…"
            parts.append(v.rjust(widths[i]) if numeric[i] else v.ljust(widths[i]))
        return "  ".join(parts).rstrip()

    numeric = [bool(cells) and all(_is_number(r[i]) for r in cells) for i in range(len(columns))]
    out.write(fmt(list(columns), numeric) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for row in cells:
        out.write(fmt(row, numeric) + "\n")
    out.write(f"({len(cells)} row{'s' if len(cells) != 1 else ''})\n")


def _is_number(s: str) -> bool:
    if s == "NULL":
        return True
    try:
        float(s)
        return True
    except ValueError:
        return False


def write_json(out: IO[str], columns: Sequence[str], rows: Iterable[Sequence]) -> None:
    """One JSON object per line (JSON lines): streams, and `jq` reads it."""
    for row in rows:
        out.write(json.dumps({c: _jsonable(v) for c, v in zip(columns, row)}, ensure_ascii=False) + "\n")


def write_csv(out: IO[str], columns: Sequence[str], rows: Iterable[Sequence]) -> None:
    w = csv.writer(out, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow(["" if v is None else _cell(v) if not isinstance(v, str) else v for v in row])


def write(out: IO[str], fmt: str, columns: Sequence[str], rows: Iterable[Sequence]) -> None:
    {"table": write_table, "json": write_json, "csv": write_csv}[fmt](out, columns, rows)
