"""Round trip with the real probes and the real broker: passed fds on this
host -> `fdpass collect --kafka` -> Kafka -> a consumer decodes exactly the
events `fdpass collect --jsonl` printed for the same transfers."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import uuid

import pytest

from tests.fixtures_bpf import require_bpf, spawn_attached

pytestmark = [pytest.mark.bpf, pytest.mark.kafka]

# Both collectors see the same syscalls, but each probe reads the clock and
# takes a sequence number of its own.
# transfer_id, like seq, is numbered by each probe load (RUN_ID << 48 | n)
PER_COLLECTOR = {"event_id", "time_ns", "seq", "transfer_id"}


def start_collector(*args):
    return spawn_attached("collect", *args)


def stop(p) -> tuple[str, str]:
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    return out, err


def consume_all(bootstrap: str, topic: str, expect: int, timeout: float = 30) -> list[bytes]:
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4()}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                if len(out) >= expect:
                    break
                continue
            assert not m.error(), m.error()
            out.append(m.value())
    finally:
        c.close()
    return out


def test_passed_fds_reach_kafka_equal_to_jsonl(kafka_broker, tmp_path):
    require_bpf()
    from fdpass.schemas import codec

    topic = f"fdpass.rt.{uuid.uuid4().hex[:8]}"
    kafka = start_collector("--kafka", kafka_broker.bootstrap, "--topic", topic, "--spool-dir", str(tmp_path / "spool"))
    jsonl = start_collector("--jsonl")
    n = 25
    a, b = socket.socketpair()
    files = [os.open("/etc/passwd", os.O_RDONLY), os.open(str(tmp_path), os.O_RDONLY)]
    try:
        for _ in range(n):
            socket.send_fds(a, [b"x"], files)
            for fd in socket.recv_fds(b, 4, 4)[1]:
                os.close(fd)
        time.sleep(0.5)
        out_j, _ = stop(jsonl)
        _, err_k = stop(kafka)
    finally:
        for fd in files:
            os.close(fd)
    socks = {os.fstat(a.fileno()).st_ino, os.fstat(b.fileno()).st_ino}
    a.close()
    b.close()
    assert "kafka_failed=0" in err_k and "kafka_dropped=0" in err_k and "kafka_spool_pending=0" in err_k, err_k

    want = [e for e in map(json.loads, out_j.splitlines()) if e["sock_ino"] in socks]
    assert len(want) == 2 * 2 * n  # 2 fds, both sides, n times
    msgs = consume_all(kafka_broker.bootstrap, topic, expect=len(want))
    got = [e for e in map(codec.decode, msgs) if e["sock_ino"] in socks]
    assert len(got) == len(want)
    assert len({e["event_id"] for e in got}) == len(got)

    def comparable(e):
        return json.dumps({k: v for k, v in e.items() if k not in PER_COLLECTOR}, sort_keys=True)

    assert sorted(map(comparable, got)) == sorted(map(comparable, want))
