"""How the sink cuts a partition's messages into batches, above all re-forming recorded ranges.

Pure logic: the messages are plain stand-ins with the three methods the
buffer reads (Kafka itself is exercised in test_sink.py).
"""

from __future__ import annotations

from fdpass.sinks.consumer import Limits, PartitionBuffer
from fdpass.sinks.state import Range


class Msg:
    def __init__(self, offset: int, size: int = 10):
        self._o, self._v = offset, b"x" * size

    def offset(self):
        return self._o

    def value(self):
        return self._v

    def partition(self):
        return 0


def msgs(a: int, b: int) -> list[Msg]:
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
    assert (b.first, b.last, len(b.messages)) == (0, 9, 8)


def test_shutdown_inside_a_recorded_range_writes_nothing_of_it():
    buf = PartitionBuffer("t", 0, [Range(0, 99, False)])
    buf.add_many(msgs(0, 50), now=0.0)
    assert cut_all(buf, 10.0, force=True) == []


def test_a_range_no_longer_in_kafka_is_skipped():
    buf = PartitionBuffer("t", 0, [Range(0, 9, False)])
    buf.add_many(msgs(20, 25), now=0.0)  # retention deleted 0-19
    assert cut_all(buf, 0.0, force=True) == [(20, 25, False)]
