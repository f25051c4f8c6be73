"""`fdpass run`: real probes into an embedded ClickHouse store, as a user runs it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.fixtures_bpf import require_bpf

pytestmark = pytest.mark.bpf

FDPASS = [sys.executable, "-m", "fdpass.cli"]


def start_run(store, *extra):
    p = subprocess.Popen(FDPASS + ["run", "--store", str(store), *extra], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    seen = []
    while True:
        line = p.stderr.readline()
        seen.append(line)
        if "probes attached" in line:
            return p
        if (not line and p.poll() is not None) or time.monotonic() > deadline:
            p.kill()
            pytest.fail("fdpass run did not start: " + "".join(seen))


def query(store, sql, *extra):
    return subprocess.run(FDPASS + ["query", "--clickhouse", f"chdb://{store}", *extra, sql],
                          capture_output=True, text=True, timeout=120)


def test_run_stores_every_transfer_and_query_reads_them(tmp_path):
    require_bpf()
    from tests.test_metrics_logs import free_port, scrape

    store = tmp_path / "store"
    port = free_port()
    p = start_run(store, "--metrics", f"127.0.0.1:{port}")
    a, b = socket.socketpair()
    n = 30
    try:
        before = scrape(port)
        with open("/etc/passwd") as f:
            for _ in range(n):
                socket.send_fds(a, [b"x"], [f.fileno()])
                for fd in socket.recv_fds(b, 4, 2)[1]:
                    os.close(fd)
        sock = os.fstat(a.fileno()).st_ino
        # while run holds the store, query says so clearly
        held = query(store, "SELECT 1")
        assert held.returncode != 0 and "in use" in held.stderr and "Traceback" not in held.stderr
        time.sleep(2.0)  # past one --batch-age: the rows are stored
        after = scrape(port)
        sent = 'fdpass_run_events_total{direction="SEND"}'
        assert after[sent] - before[sent] >= n
        assert after["fdpass_run_stored_total"] - before["fdpass_run_stored_total"] >= 2 * n
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
        a.close()
        b.close()
    assert p.returncode == 0, err
    assert "stopped;" in err
    r = query(store, f"SELECT direction, count(), uniqExact(event_id) FROM fdpass.events "
                     f"WHERE sock_ino = {sock} OR peer_sock_ino = {sock} GROUP BY direction ORDER BY direction", "--csv")
    assert r.returncode == 0, r.stderr
    rows = [line.split(",") for line in r.stdout.strip().splitlines()[1:]]
    assert [(d.strip('"'), int(c), int(u)) for d, c, u in rows] == [("SEND", n, n), ("RECV", n, n)]


def test_run_bad_store_is_one_clear_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = subprocess.run(FDPASS + ["run", "--store", str(f / "sub"), "--duration", "1"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "--store" in r.stderr and "Traceback" not in r.stderr
