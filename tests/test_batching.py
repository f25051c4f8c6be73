"""How the sink cuts a partition's messages into batches, above all re-forming recorded ranges.

Pure logic on confluent_kafka Message objects made here (Kafka itself is
exercised in test_sink.py).
"""

from __future__ import annotations

from confluent_kafka import Message

from fdpass.sinks.consumer import Limits, PartitionBuffer
from fdpass.sinks.state import Range


def Msg(offset: int, size: int = 10) -> Message:
    return Message(topic="t", partition=0, offset=offset, key=b"k%d" % offset, value=b"x" * size)


def msgs(a: int, b: int) -> list[Message]:
    return [Msg(o) for o in range(a, b + 1)]


LIM = Limits(rows=64, nbytes=1 << 20, age=1.0)


def cut_all(buf: PartitionBuffer, now: float, force: bool = False) -> list[tuple[int, int, bool]]:
    out = []
    while (b := buf.cut(now, LIM, force)) is not None:
        out.append((b.first, b.last, b.done_before))
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
