"""A full disk under the chDB store, filled during a run: the sink and `fdpass run` stop inserting (and the
sink committing), say why once (then every 30 s), and resume when space returns; nothing is lost, nothing is
stored twice. Real tmpfs with size= (root), real Kafka, chDB, real probes for `run`."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time

import pytest

from fdpass.sinks.consumer import SinkConfig
from tests.fixtures_clickhouse import ThreadSink, all_committed, committed_offsets, create_topic, produce, unique, wait_until
from tests.fixtures_disk import fill, small_tmpfs
from tests.test_sink_incarnation import encoded, expected_ids, stored_ids

LEAVE = 256 << 10  # bytes left free: less than any insert reserves (ClickHouse reserves >= 1 MiB)


@pytest.mark.kafka
def test_sink_stops_on_a_full_disk_and_resumes_when_space_returns(kafka_broker, open_store, tmp_path, caplog):
    bs = kafka_broker.bootstrap
    topic, group = unique("t-full"), unique("g-full")
    create_topic(bs, topic, 2)
    with small_tmpfs(tmp_path / "disk", "64m") as mnt:
        store = open_store(mnt / "store")
        client = store.client()
        sink = ThreadSink(store, SinkConfig(bootstrap=bs, topic=topic, group=group, batch_rows=500,
                                            batch_age=0.2)).start()
        try:
            produce(bs, topic, *encoded(0, 1000))
            wait_until(lambda: all_committed(bs, group, topic, 2), 60, "the first events stored")
            filler = fill(mnt, LEAVE)
            with caplog.at_level(logging.INFO, logger="fdpass.sink"):
                produce(bs, topic, *encoded(1000, 2000))
                before = committed_offsets(bs, group, topic, 2)
                time.sleep(6)
                # nothing inserted, nothing committed while the disk is full
                assert stored_ids(client)[0] == 1000
                assert committed_offsets(bs, group, topic, 2) == before
                said = [r.getMessage() for r in caplog.records if "not stored:" in r.getMessage()]
                # once (per writer thread: each holds one partition's batch)
                assert 1 <= len(said) <= 2 and all("disk is full" in m for m in said), said
                assert not any("still not stored" in r.getMessage() for r in caplog.records)
                filler.unlink()
                t_free = time.monotonic()
                wait_until(lambda: all_committed(bs, group, topic, 2), 60, "everything stored once space returned")
                resumed = time.monotonic() - t_free
            assert any("store is back" in r.getMessage() for r in caplog.records)
        finally:
            assert sink.stop() == 0
        n, ids = stored_ids(client)
        assert (n, len(ids)) == (3000, 3000) and ids == expected_ids(0, 3000)
        print(f"\nsink: stored again {resumed:.1f} s after space returned; {sink.sink.stats}")


@pytest.mark.bpf
def test_run_stops_on_a_full_disk_and_resumes_when_space_returns(tmp_path):
    from tests.fixtures_bpf import require_bpf, spawn_attached
    from tests.test_run import counts_by_direction

    require_bpf()
    n = 200
    with small_tmpfs(tmp_path / "disk", "64m") as mnt:
        store = mnt / "store"
        p = spawn_attached("run", "--store", str(store), "--batch-age", "0.2")
        a, b = socket.socketpair()
        sock = os.fstat(a.fileno()).st_ino

        def transfers():
            with open("/etc/passwd") as f:
                for _ in range(n):
                    socket.send_fds(a, [b"x"], [f.fileno()])
                    for fd in socket.recv_fds(b, 4, 2)[1]:
                        os.close(fd)

        try:
            transfers()
            time.sleep(2)  # stored
            filler = fill(mnt, LEAVE)
            transfers()
            time.sleep(4)  # refused meanwhile
            filler.unlink()
            transfers()
            time.sleep(3)
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            counts = counts_by_direction(store, sock)  # while the tmpfs is mounted
        finally:
            for closing in (p.kill if p.poll() is None else None, a.close, b.close):
                if closing is not None:
                    closing()
    assert counts == [("SEND", 3 * n, 3 * n), ("RECV", 3 * n, 3 * n)], err[-3000:]
    said = [line for line in err.splitlines() if "not stored:" in line]
    assert len(said) == 1 and "disk is full" in said[0], err[-3000:]
    assert "store is back" in err
    assert "Traceback" not in err


def test_a_full_disk_is_retried_every_second_other_failures_with_backoff(monkeypatch):
    from fdpass.sinks import exactly_once
    from fdpass.sinks.exactly_once import Retrying, StoreError
    from tests.test_batching import _batch, _Clock, _FlakyStore

    class _Refusing(_FlakyStore):
        def __init__(self, failures, text):
            super().__init__(failures)
            self.text = text

        def store(self, b):
            if self.left:
                self.calls += 1
                self.left -= 1
                raise StoreError(self.text)
            super().store(b)

    waits = {}
    for name, text in (("full", "Code: 243. DB::Exception: Cannot reserve 5.81 MiB, not enough space. "
                                "(NOT_ENOUGH_SPACE)"),
                       ("down", "Code: 210. Connection refused")):
        clock = _Clock()
        monkeypatch.setattr(exactly_once.time, "monotonic", clock.monotonic)
        assert Retrying(_Refusing(8, text), clock, "never").store(_batch()) is True
        waits[name] = clock.now
    assert waits["full"] == 8 * Retrying.DISK_FULL_RETRY_S  # back within a second of space returning
    assert waits["down"] == 0.5 + 1 + 2 + 4 + 8 + 16 + 30 + 30
