"""Zero-gap collector restart (collector/handover.py): a second `fdpass collect --kafka` starts on the same
spool while the first runs; they cut over at a kernel time, the first exits by itself. Real probes, a real
broker; a workload passes descriptors steadily across the handover. Every transfer arrives exactly once, from
two runs, and the gaps question (fdpass/questions.py) finds no hole.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from fdpass.schemas import codec
from tests.fixtures_bpf import require_bpf, spawn_attached
from tests.fixtures_clickhouse import consume_all, unique

pytestmark = [pytest.mark.bpf, pytest.mark.kafka]

# Passes /etc/passwd over a socketpair ~1000 times a second from a line on stdin until stdin closes; prints
# its socket's inode at start and the number of transfers at the end.
WORKLOAD = r"""
import os, socket, sys, threading, time
a, b = socket.socketpair()
print(os.fstat(a.fileno()).st_ino, flush=True)
sys.stdin.readline()
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
n = 0
with open("/etc/passwd") as f:
    while not stop.is_set():
        for _ in range(10):
            socket.send_fds(a, [b"x"], [f.fileno()])
            for fd in socket.recv_fds(b, 4, 2)[1]:
                os.close(fd)
            n += 1
        time.sleep(0.01)
print(n, flush=True)
"""


def collect(bootstrap: str, topic: str, spool, pid: int, *extra: str) -> subprocess.Popen:
    return spawn_attached("collect", "--kafka", bootstrap, "--topic", topic, "--spool-dir", str(spool),
                          "--pid", str(pid), *extra)


def test_a_new_collector_takes_over_with_no_gap_and_nothing_twice(kafka_broker, tmp_path, open_store):
    require_bpf()
    from fdpass.collector.handover import HANDOVER_RUN_BIT
    from fdpass.schemas import avro
    from fdpass.schemas.clickhouse import ensure_schema
    from fdpass.sinks import conversion
    from tests.test_questions import ask

    bs, topic, spool = kafka_broker.bootstrap, unique("t-handover"), tmp_path / "spool"
    work = subprocess.Popen([sys.executable, "-c", WORKLOAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    old = new = None
    try:
        sock = int(work.stdout.readline())
        # as deploy/kubernetes/daemonset.yaml runs them: the old one idles after handing over, the new one
        # says it is ready once it has taken over
        old = collect(bs, topic, spool, work.pid, "--after-handover", "wait")
        work.stdin.write("go\n")
        work.stdin.flush()
        time.sleep(2)
        t0 = time.monotonic()
        ready = tmp_path / "ready"
        new = collect(bs, topic, spool, work.pid, "--after-handover", "wait", "--ready-file", str(ready))
        took = time.monotonic() - t0  # returns once it has taken over: the old one is done
        assert ready.exists()
        time.sleep(1)
        assert old.poll() is None, "the old collector exited instead of idling (--after-handover wait)"
        old.send_signal(signal.SIGTERM)
        _, old_err = old.communicate(timeout=60)
        assert old.returncode == 0, old_err
        assert "idle until stopped" in old_err
        time.sleep(2)
        work.stdin.close()
        transfers = int(work.stdout.readline())
        work.wait(30)
        new.send_signal(signal.SIGINT)
        _, new_err = new.communicate(timeout=60)
        assert new.returncode == 0, new_err
    finally:
        for p in (work, old, new):
            if p is not None and p.poll() is None:
                p.kill()
    # each left the other's side of the overlap to it (the new one's "took over" line came before "attached")
    assert "taking over this output" in old_err and "handover_left_to_the_other" in old_err, old_err[-2000:]
    assert "handover_left_to_the_other" in new_err, new_err[-2000:]

    msgs = consume_all(bs, topic, 2 * transfers)
    events = [codec.decode(m.value()) for m in msgs]
    mine = [e for e in events if sock in (e["sock_ino"], e["peer_sock_ino"])]
    ids = {e["event_id"] for e in mine}
    runs = {e["seq"] >> 48 for e in mine}
    sends = sum(e["direction"] == "SEND" for e in mine)
    recvs = sum(e["direction"] == "RECV" for e in mine)
    for name, err in (("old", old_err), ("new", new_err)):
        print(f"\n{name}: " + " | ".join(line for line in err.splitlines() if "stopped;" in line or "publisher" in line))
    print(f"\n{transfers} transfers; {len(mine)} events from runs {sorted(runs)}; handover took {took:.1f} s "
          f"(from the new collector's start to its first read)")
    assert (sends, recvs, len(ids)) == (transfers, transfers, 2 * transfers)
    assert len(runs) == 2 and sum(bool(r & HANDOVER_RUN_BIT) for r in runs) == 1, runs

    client = open_store().client()
    ensure_schema(client)
    client.raw_insert("fdpass.events", insert_block=conversion.avro_container(
        avro.CURRENT_VERSION, [m.value() for m in msgs]), fmt="Avro")
    hosts = {e["host"] for e in mine}
    assert [r for h in hosts for r in ask(client, "gaps", host=h)] == []
