"""How the sink cuts a partition's messages into batches, above all re-forming recorded ranges.

Pure logic on confluent_kafka Message objects made here (Kafka itself is
exercised in test_sink.py).
"""

from __future__ import annotations

import pytest

from confluent_kafka import Message

from fdpass.sinks.consumer import Limits, PartitionBuffer
from fdpass.sinks.exactly_once import Phase, Range


def Msg(offset: int, size: int = 10) -> Message:
    return Message(topic="t", partition=0, offset=offset, key=b"k%d" % offset, value=b"x" * size)


def msgs(a: int, b: int) -> list[Message]:
    return [Msg(o) for o in range(a, b + 1)]


LIM = Limits(rows=64, nbytes=1 << 20, age=1.0)


def cut_all(buf: PartitionBuffer, now: float, force: bool = False) -> list[tuple[int, int, bool]]:
    out = []
    while (b := buf.cut(now, LIM, force)) is not None:
        out.append((b.first, b.last, b.phase is Phase.ALREADY_DONE))
    return out


def test_limits_close_batches():
    buf = PartitionBuffer("t", 0, [])
    buf.add_many(msgs(0, 99), now=0.0)
    assert cut_all(buf, 0.1) == [(0, 63, False)]  # rows; the rest waits
    assert cut_all(buf, 1.2) == [(64, 99, False)]  # age
    buf.add_many(msgs(100, 104), now=2.0)
    assert cut_all(buf, 2.1, force=True) == [(100, 104, False)]  # shutdown


def test_recorded_range_is_re_formed_exactly_whatever_the_limits_say():
    buf = PartitionBuffer("t", 0, [Range(0, 299, False), Range(300, 310, True)])
    for a in range(0, 320, 37):  # arrives in odd chunks
        buf.add_many(msgs(a, min(a + 36, 330)), now=0.0)
        if a + 36 < 299:
            assert buf.cut(5.0, LIM) is None  # old, many rows: still waits for offset 299
    assert cut_all(buf, 0.0) == [(0, 299, False), (300, 310, True)]  # 311-330: young and few, waits
    assert cut_all(buf, 1.5) == [(311, 330, False)]


def test_unrecorded_messages_before_a_range_end_before_it():
    buf = PartitionBuffer("t", 0, [Range(100, 150, False)])
    buf.add_many(msgs(90, 160), now=0.0)
    assert cut_all(buf, 0.0) == [(90, 99, False), (100, 150, False)]


def test_gaps_in_offsets_do_not_change_the_range():
    # compaction or transaction markers: offsets 5 and 9 never arrive
    buf = PartitionBuffer("t", 0, [Range(0, 9, False)])
    buf.add_many([Msg(o) for o in (0, 1, 2, 3, 4, 6, 7, 8, 10, 11)], now=0.0)
    b = buf.cut(0.0, LIM)
    assert (b.first, b.last, len(b.values), list(b.offsets)) == (0, 9, 8, [0, 1, 2, 3, 4, 6, 7, 8])


def test_shutdown_inside_a_recorded_range_writes_nothing_of_it():
    buf = PartitionBuffer("t", 0, [Range(0, 99, False)])
    buf.add_many(msgs(0, 50), now=0.0)
    assert cut_all(buf, 10.0, force=True) == []


def test_a_range_no_longer_in_kafka_is_skipped():
    buf = PartitionBuffer("t", 0, [Range(0, 9, False)])
    buf.add_many(msgs(20, 25), now=0.0)  # retention deleted 0-19
    assert cut_all(buf, 0.0, force=True) == [(20, 25, False)]


def test_bytes_stay_exact_when_a_cut_splits_an_arrival():
    buf = PartitionBuffer("t", 0, [])
    for a in range(0, 100, 30):  # arrivals of 30 messages; message o holds o + 1 bytes
        buf.add_many([Msg(o, size=o + 1) for o in range(a, min(a + 30, 100))], now=0.0)
    b = buf.cut(0.0, LIM)  # 64 rows: cuts the third arrival
    assert (b.first, b.last, b.nbytes) == (0, 63, sum(range(1, 65)))
    assert b.values == [b"x" * (o + 1) for o in range(64)] and list(b.offsets) == list(range(64))
    assert buf.nbytes == sum(range(65, 101))
    b = buf.cut(0.0, LIM, force=True)
    assert (b.first, b.last, b.nbytes, buf.nbytes) == (64, 99, sum(range(65, 101)), 0)


def test_bytes_close_a_batch():
    buf = PartitionBuffer("t", 0, [])
    buf.add_many([Msg(o, size=300_000) for o in range(3)], now=0.0)
    assert buf.cut(0.0, LIM) is None  # 900 kB, 3 rows, young: waits
    buf.add_many([Msg(3, size=300_000)], now=0.0)
    b = buf.cut(0.0, LIM)  # 1.2 MB >= the 1 MiB limit
    assert (b.first, b.last, buf.nbytes) == (0, 3, 0)


def test_a_batch_rebuilds_its_messages_for_the_dead_letter_topic():
    buf = PartitionBuffer("t", 3, [])
    buf.add_many([Message(topic="t", partition=3, offset=o, key=None if o % 2 else b"k", value=None if o == 2 else b"v")
                  for o in range(4)], now=0.0)
    b = buf.cut(0.0, LIM, force=True)
    m = b.message(2)
    assert (m.topic(), m.partition(), m.offset(), m.key(), m.value()) == ("t", 3, 2, b"k", None)
    assert b.nbytes == 3 and b.message(1).key() is None


class _Recorder:
    """Stands in for BatchLog, the insert and the dead-letter producer: records the protocol's calls."""

    def __init__(self, dead=(), fail: str | None = None):
        self.calls: list[str] = []
        self.dead, self.fail = list(dead), fail

    def _step(self, name: str):
        self.calls.append(name)
        if name == self.fail:
            raise RuntimeError(f"{name} failed")

    def intent(self, *_):
        self._step("intent")

    def done(self, *_):
        self._step("done")

    def insert(self, batch):
        self._step("insert")
        return len(batch.values) - len(self.dead), self.dead

    def send(self, msg, reason, detail):
        self.calls.append(f"dead:{msg.offset()}:{reason}")

    def flush(self):
        self._step("flush")


def _batch(**kw):
    from fdpass.sinks.exactly_once import Batch

    return Batch("t", 0, 10, 12, [b"a", b"b", b"c"], [None] * 3, [10, 11, 12], **kw)


def test_protocol_steps_in_order_and_phases():
    """intent -> insert -> dead letters flushed -> done; a failed step leaves the
    batch in the phase before it, never DONE, so it is not committed."""
    from fdpass.sinks.exactly_once import ExactlyOnce, Phase, StoreError

    r = _Recorder(dead=[(1, "corrupt_body", "x")])
    b = _batch()
    ExactlyOnce(r, r, r.insert).store(b)
    assert r.calls == ["intent", "insert", "dead:11:corrupt_body", "flush", "done"]
    assert (b.phase, b.stored, b.rows, b.dead) == (Phase.DONE, True, 2, 1)

    r = _Recorder()
    b = _batch(phase=Phase.ALREADY_DONE)
    ExactlyOnce(r, r, r.insert).store(b)
    assert r.calls == [] and b.stored

    for fail, phase in (("intent", Phase.FORMED), ("flush", Phase.INSERTED), ("done", Phase.DEAD_LETTERED)):
        r = _Recorder(dead=[(0, "truncated", "y")], fail=fail)
        b = _batch()
        with pytest.raises(StoreError):
            ExactlyOnce(r, r, r.insert).store(b)
        assert (b.phase, b.stored) == (phase, False), fail
        assert "done" not in r.calls[:-1]


def test_insert_only_stores_without_a_range_log_and_reports_rejects():
    """`fdpass run`'s protocol: the insert, rejects handed on, DONE; nothing recorded in sink_batches."""
    from fdpass.sinks.exactly_once import InsertOnly

    r = _Recorder(dead=[(2, "corrupt_body", "x")])
    told = []
    b = _batch()
    InsertOnly(r.insert, lambda batch, dead: told.append((batch.first, dead))).store(b)
    assert r.calls == ["insert"]
    assert told == [(10, [(2, "corrupt_body", "x")])]
    assert (b.phase, b.stored, b.rows, b.dead) == (Phase.DONE, True, 2, 1)


class _FlakyStore:
    """A protocol whose store() fails `failures` times with StoreError, then stores."""

    def __init__(self, failures: int):
        self.left, self.calls = failures, 0

    def store(self, b):
        from fdpass.sinks.exactly_once import StoreError

        self.calls += 1
        if self.left:
            self.left -= 1
            raise StoreError("Code: 243. NOT_ENOUGH_SPACE")
        b.phase = Phase.DONE


class _Clock:
    """time.monotonic and Event.wait stand-ins: waiting advances the clock instead of sleeping."""

    def __init__(self):
        self.now = 0.0
        self.set = False

    def monotonic(self):
        return self.now

    def wait(self, seconds):
        self.now += seconds
        return self.set

    def is_set(self):
        return self.set


def test_retrying_keeps_the_batch_says_why_once_and_every_30s_then_that_it_is_back(monkeypatch, caplog):
    from fdpass.sinks import exactly_once
    from fdpass.sinks.exactly_once import Retrying

    clock = _Clock()
    monkeypatch.setattr(exactly_once.time, "monotonic", clock.monotonic)
    store = _FlakyStore(failures=12)  # backoff 0.5, 1, 2 ... 30 capped: about 4.5 minutes of failures
    retry = Retrying(store, clock, "never")
    b = _batch()
    with caplog.at_level("INFO", logger="fdpass.sink"):
        assert retry.store(b) is True
    assert store.calls == 13 and b.stored and not retry.retrying and retry.error is None
    assert retry.failures == 12
    said = [r.getMessage() for r in caplog.records]
    assert "not stored: Code: 243" in said[0] and "nothing is committed or dropped" in said[0]
    repeats = [m for m in said if "still not stored" in m]
    # one line per 30 s of outage, not one per attempt
    assert len(repeats) == pytest.approx(clock.now / 30, abs=1.5) and len(repeats) < 12
    assert "store is back" in said[-1] and "after 12 failed attempts" in said[-1]


def test_retrying_gives_up_only_when_told_and_leaves_the_batch_unstored(monkeypatch):
    from fdpass.sinks import exactly_once
    from fdpass.sinks.exactly_once import Retrying

    clock = _Clock()
    monkeypatch.setattr(exactly_once.time, "monotonic", clock.monotonic)
    store = _FlakyStore(failures=10**9)
    retry = Retrying(store, clock, "not committed")

    def wait_then_give_up(seconds):
        clock.now += seconds
        clock.set = store.calls >= 5
        return clock.set

    clock.wait = wait_then_give_up
    b = _batch()
    assert retry.store(b) is False
    assert store.calls == 6 and not b.stored and not retry.retrying
