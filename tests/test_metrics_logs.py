"""--metrics (Prometheus) and --log-format json, scraped and read as an operator would."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
import urllib.request

import pytest

from fdpass import metrics
from fdpass.errors import UserError
from tests.fixtures_bpf import require_bpf, spawn_attached


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def transfers(n: int) -> None:
    a, b = socket.socketpair()
    with open("/etc/passwd") as f:
        for _ in range(n):
            socket.send_fds(a, [b"x"], [f.fileno()])
            for fd in socket.recv_fds(b, 4, 2)[1]:
                os.close(fd)
    a.close()
    b.close()


@pytest.mark.bpf
def test_collect_metrics_move_during_a_run():
    require_bpf()
    port = free_port()
    # --pid: only this test's transfers reach the stdout pipe, which nobody reads
    # until the end (the whole host's would fill it and stall the collector)
    p = spawn_attached("collect", "--jsonl", "--pid", str(os.getpid()), "--metrics", f"127.0.0.1:{port}",
                       "--log-format", "json")
    try:
        before = scrape(port)
        transfers(20)
        time.sleep(0.5)
        after = scrape(port)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    send = 'fdpass_collect_events_total{direction="SEND"}'
    recv = 'fdpass_collect_events_total{direction="RECV"}'
    assert after[send] - before[send] >= 20 and after[recv] - before[recv] >= 20
    assert "fdpass_collect_kernel_ringbuf_drops_total" in after
    # json logs: every stderr line that is a log record parses
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert all({"time", "level", "component", "message"} <= r.keys() for r in records)


def test_metrics_address_is_checked():
    with pytest.raises(UserError, match="HOST:PORT"):
        metrics.parse_address("nonsense")
    with pytest.raises(UserError, match="HOST:PORT"):
        metrics.parse_address("127.0.0.1:99999")
    assert metrics.parse_address(":9464") == ("0.0.0.0", 9464)


def test_metrics_exposition_from_stats():
    port = free_port()
    calls = {"n": 0}

    def stats():
        calls["n"] += 1
        return {"events_send": 3 * calls["n"], "events_recv": 1, "spool_bytes": 10, "name": "skip me"}

    server = metrics.serve(f"127.0.0.1:{port}", {"collect": stats})
    try:
        first = scrape(port)
        second = scrape(port)
    finally:
        server.shutdown()
    assert second['fdpass_collect_events_total{direction="SEND"}'] > first['fdpass_collect_events_total{direction="SEND"}']
    assert first["fdpass_collect_spool_bytes"] == 10  # a gauge: no _total
    assert not any(re.search("name", k) for k in first)
