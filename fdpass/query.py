"""`fdpass query`: ask the event store a named forensic question (fdpass/questions.py) or run SQL,
and print the answer: an aligned table for people, JSON lines or CSV for programs.

No heavy imports at module level: fdpass/cli.py registers every sub-command on
each start, also for `fdpass --help`.
"""

from __future__ import annotations

import argparse
import os
import sys

import csv
import datetime as _dt
import decimal
import ipaddress
import json
import uuid
from typing import IO, Iterable, Sequence

from fdpass import defaults
from fdpass.errors import UserError

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


def register(sub) -> None:
    from fdpass import questions

    q = sub.add_parser(
        "query", help="ask the event store a named forensic question, or run SQL",
        description=f"Ask the fdpass store (table {defaults.EVENTS_TABLE}) a named question, or run SQL. An "
                    "aligned table by default; --json (JSON lines) or --csv for programs.",
        epilog=questions.QUERY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("sql", metavar="QUESTION|SQL",
                   help=f'a question below, or SQL, e.g. "SELECT host, count() FROM {defaults.EVENTS_TABLE} '
                        'GROUP BY host"')
    questions.add_arguments(q)
    from fdpass.sinks.store import add_store_args

    add_store_args(q)
    out = q.add_mutually_exclusive_group()
    out.add_argument("--json", dest="format", action="store_const", const="json", help="JSON lines")
    out.add_argument("--csv", dest="format", action="store_const", const="csv", help="CSV with a header row")
    q.set_defaults(func=run_query, format="table")


def run_query(args) -> int:
    from clickhouse_connect.driver.exceptions import ClickHouseError

    from fdpass import logs, questions

    logs.quiet_client_libraries()
    if args.sql in ("chain", "graph"):
        return _run_chain_or_graph(args)
    used = [o for o in ("event_id", "fd", "output") if getattr(args, o, None) is not None]
    if used:
        raise UserError(", ".join("--" + o.replace("_", "-") for o in used) + " are options of chain and graph")
    questions.from_args(args.sql, args)  # bad question options: say so before opening anything
    with _open(args) as store:
        client = store.client()
        sql, params = questions.from_args(args.sql, args, client) or (args.sql, None)
        try:
            result = client.query(sql, parameters=params)
        except ClickHouseError as e:
            first = " ".join(str(e).split())
            raise UserError(f"ClickHouse: {first[:500]}") from None
        write(sys.stdout, args.format, result.column_names, result.result_rows)
    return 0


def _open(args):
    from fdpass.sinks.store import open_store, parse_dsn

    spec = parse_dsn(args.clickhouse)
    if spec.kind == "chdb" and not os.path.isdir(spec.path):
        raise UserError(f"no store at {spec.path} (start `fdpass sink` or `fdpass run` first, or pass --clickhouse)")
    return open_store(args.clickhouse, args.clickhouse_password_file)


def _run_chain_or_graph(args) -> int:
    """`fdpass query chain` (fdpass/chain.py) and `fdpass query graph` (fdpass/graph.py)."""
    from clickhouse_connect.driver.exceptions import ClickHouseError

    from fdpass import chain, graph, questions

    options = {k: getattr(args, k, None) for k in questions.OPTION_NAMES}
    if args.sql == "graph":
        if not args.output:
            raise UserError("`fdpass query graph` needs --output FILE.svg|FILE.png|FILE.dot, or --output - for DOT")
        graph.output_format(args.output)
        if args.of != "chain" and (args.event_id is not None or args.fd is not None):
            raise UserError("--event-id and --fd start a chain: add --of chain")
    else:
        for opt in ("output", "of"):
            if getattr(args, opt) not in (None, "transfers"):  # --of's default is transfers
                raise UserError(f"--{opt.replace('_', '-')} is an option of `fdpass query graph`")
    if args.sql == "chain" or args.of == "chain":
        chain.check_options(options, args.event_id, args.fd)
    with _open(args) as store:
        client = store.client()
        try:
            if args.sql == "chain":
                columns, rows, remarks = chain.run(client, options, event_id=args.event_id, fd=args.fd,
                                                   depth=args.depth)
                write(sys.stdout, args.format, columns, rows)
            else:
                if args.of == "chain":
                    chains, remarks = chain.find(client, options, event_id=args.event_id, fd=args.fd,
                                                 depth=args.depth)
                    hops = [h.row for c in chains for h in c if h.depth <= args.depth]
                else:
                    q = questions.HOPS if args.of == "transfers" else questions.CROSS_HOPS
                    sql, params = questions.build_question(q, options, args.limit,
                                                           questions.materialized_ctes(client))
                    r = client.query(sql, parameters=params)
                    hops = [dict(zip(r.column_names, row)) for row in r.result_rows]
                    remarks = [f"--limit {args.limit} reached: the first {args.limit} transfers are drawn"] \
                        if len(hops) >= args.limit else []
                dot, more = graph.build_dot(hops, title=_graph_title(args), max_nodes=args.max_nodes,
                                            max_edges=args.max_edges)
                remarks += more
                graph.write(dot, args.output, sys.stdout)
                if args.output != "-":
                    print(f"{args.output}: {len(hops)} transfers", file=sys.stderr)
        except ClickHouseError as e:
            raise UserError(f"ClickHouse: {' '.join(str(e).split())[:500]}") from None
    for remark in remarks:
        print(f"fdpass query {args.sql}: {remark}", file=sys.stderr)
    return 0


def _graph_title(args) -> str:
    given = [f"--{k} {getattr(args, k)}" for k in ("host", "since", "until", "path", "dev", "ino", "pid", "comm",
                                                    "exe", "container", "event_id", "fd")
             if getattr(args, k, None) is not None]
    return f"fdpass {args.of} " + " ".join(given)
