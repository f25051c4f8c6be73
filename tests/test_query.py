"""`fdpass query` on a real chDB store, and the store's one-process lock turned into a clear message."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest

from fdpass.schemas import clickhouse as ddl
from fdpass import query as fmt
from tests.fixtures_clickhouse import FDPASS, ROOT


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*FDPASS, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.fixture
def filled_store(open_store, store_dir):
    """A store with three events, closed again so a subprocess can open it."""
    store = open_store()
    c = store.client()
    ddl.ensure_schema(c)
    names = ["event_id", "time_ns", "host", "direction", "syscall", "file_type", "file_path", "exe", "pid"]
    rows = [
        ["a", 1_795_000_000_000_000_001, "web-1", "SEND", "SENDMSG", "REGULAR", "/etc/shadow", "/usr/sbin/sshd", 10],
        ["b", 1_795_000_000_000_000_002, "web-1", "RECV", "RECVMSG", "REGULAR", "/etc/shadow", None, 11],
        ["c", 1_795_000_000_000_000_003, "db-2", "SEND", "SENDMSG", "SOCKET", 'socket:[42] "quoted", tab\there', None, 12],
    ]
    c.insert("fdpass.events", rows, column_names=names)
    store.close()
    return store_dir


SQL = "SELECT event_id, host, pid, exe, file_path, time FROM fdpass.events ORDER BY event_id"


def test_table_output(filled_store):
    p = run("query", "--clickhouse", f"chdb://{filled_store}", SQL)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["event_id", "host", "pid", "exe", "file_path", "time"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split()[:4] == ["a", "web-1", "10", "/usr/sbin/sshd"]
    assert "NULL" in lines[3]
    assert lines[-1] == "(3 rows)"
    # columns aligned: every row's `host` starts where the header's does
    col = lines[0].index("host")
    assert all(line[col:].startswith(("web-1", "db-2")) for line in lines[2:5])


def test_json_output_is_json_lines(filled_store):
    p = run("query", "--clickhouse", f"chdb://{filled_store}", "--json", SQL)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["event_id"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["exe"] == "/usr/sbin/sshd" and rows[1]["exe"] is None
    assert rows[0]["pid"] == 10
    assert rows[0]["time"].startswith("2026-11-18T11:06:40") and rows[0]["time"].endswith("+00:00")
    assert rows[2]["file_path"] == 'socket:[42] "quoted", tab\there'


def test_csv_output(filled_store):
    p = run("query", "--clickhouse", f"chdb://{filled_store}", "--csv", SQL)
    assert p.returncode == 0, p.stderr
    rows = list(csv.reader(io.StringIO(p.stdout)))
    assert rows[0] == ["event_id", "host", "pid", "exe", "file_path", "time"]
    assert rows[3][4] == 'socket:[42] "quoted", tab\there'  # quoting round-trips
    assert rows[2][3] == ""  # NULL


def test_bad_sql_is_one_clear_line(filled_store):
    p = run("query", "--clickhouse", f"chdb://{filled_store}", "SELEKT 1")
    assert p.returncode == 2
    assert p.stderr.startswith("fdpass query: ClickHouse:") and "Traceback" not in p.stderr
    assert "SYNTAX_ERROR" in p.stderr or "Syntax error" in p.stderr


def test_missing_store(tmp_path):
    p = run("query", "--clickhouse", f"chdb://{tmp_path}/nope", "SELECT 1")
    assert p.returncode == 2 and "no store at" in p.stderr and "Traceback" not in p.stderr


def test_store_in_use_names_the_holder(filled_store, open_store):
    import os

    held = open_store(filled_store)  # this process holds it, as `fdpass sink` would
    held.client()
    p = run("query", "--clickhouse", f"chdb://{filled_store}", "SELECT 1")
    assert p.returncode == 2, p.stdout
    assert f"is in use by another fdpass process (pid {os.getpid()})" in p.stderr
    assert "Traceback" not in p.stderr


def test_formatters_directly():
    out = io.StringIO()
    fmt.write_table(out, ["n", "s"], [(1, "x"), (22, None)])
    assert out.getvalue().splitlines() == [" n  s", "--  ----", " 1  x", "22  NULL", "(2 rows)"]


def test_embedded_store_without_chdb_says_how_to_get_it(tmp_path):
    """chDB is the optional extra `embedded`: an install without it gets one
    line naming the extra and the server alternative, not a traceback."""
    code = ("import sys; sys.modules['chdb'] = None\n"
            "from fdpass.cli import main\n"
            f"sys.exit(main(['query', '--clickhouse', 'chdb://{tmp_path}', 'SELECT 1']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode != 0
    assert "pip install 'fdpass[embedded]'" in p.stderr and "Traceback" not in p.stderr, p.stderr
