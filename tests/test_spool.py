"""The on-disk spool alone: order, bounds, recovery after a crash (no broker)."""

from __future__ import annotations

import pytest

from fdpass.collector.spool import Spool, SpoolLocked


def drain(spool: Spool) -> list[tuple[bytes, bytes]]:
    out = []
    while (rec := spool.read()) is not None:
        seg, key, value = rec
        out.append((key, value))
        spool.settle(seg)
    return out


def records(n, start=0):
    return [(b"host-%d" % (i % 3), b"value-%06d" % i) for i in range(start, start + n)]


def test_order_across_segments_and_files_deleted_when_delivered(tmp_path):
    s = Spool(tmp_path, segment_bytes=200)
    recs = records(50)
    for k, v in recs:
        assert s.append(k, v)
    assert len(list(tmp_path.glob("*.seg"))) > 3  # several segments
    assert s.pending == 50
    assert drain(s) == recs
    assert s.pending == 0 and s.bytes_used == 0
    assert not list(tmp_path.glob("*.seg"))
    s.close()


def test_records_survive_a_restart_and_prepend_goes_first(tmp_path):
    s = Spool(tmp_path, segment_bytes=300)
    for k, v in records(20, 100):
        s.append(k, v)
    assert s.prepend(records(5)) == 5  # older than what was spooled
    s.close()
    s2 = Spool(tmp_path)
    assert s2.pending == 25
    assert drain(s2) == records(5) + records(20, 100)
    s2.close()


def test_unsettled_records_are_replayed_after_restart(tmp_path):
    s = Spool(tmp_path)
    for k, v in records(10):
        s.append(k, v)
    got = [s.read() for _ in range(4)]  # handed out, never delivered
    assert [g[2] for g in got] == [v for _, v in records(4)]
    s.close()
    s2 = Spool(tmp_path)
    assert drain(s2) == records(10)  # at-least-once: the whole segment again
    s2.close()


def test_bound_refuses_records_past_max_bytes(tmp_path):
    s = Spool(tmp_path, max_bytes=1000)
    accepted = sum(s.append(k, v) for k, v in records(100))
    assert 0 < accepted < 100
    assert s.bytes_used <= 1000
    assert drain(s) == records(accepted)
    assert s.append(b"k", b"v")  # room again once delivered
    s.close()


def test_torn_tail_after_crash_keeps_the_good_records(tmp_path):
    s = Spool(tmp_path)
    for k, v in records(10):
        s.append(k, v)
    s.close()
    (seg,) = tmp_path.glob("*.seg")
    data = seg.read_bytes()
    seg.write_bytes(data[:-5])  # the last record's write was cut short
    s2 = Spool(tmp_path)
    assert s2.corrupt_records == 1
    assert drain(s2) == records(9)
    assert not list(tmp_path.glob("*.seg"))
    s2.close()


def test_flipped_bit_stops_replay_of_that_segment(tmp_path):
    s = Spool(tmp_path)
    for k, v in records(10):
        s.append(k, v)
    s.close()
    (seg,) = tmp_path.glob("*.seg")
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0x40
    seg.write_bytes(bytes(data))
    s2 = Spool(tmp_path)
    assert s2.corrupt_records == 1
    got = drain(s2)
    assert got == records(len(got)) and len(got) < 10  # a good prefix, nothing garbled
    s2.close()


def test_one_process_per_spool_dir(tmp_path):
    s = Spool(tmp_path)
    with pytest.raises(SpoolLocked):
        Spool(tmp_path)
    s.close()
    Spool(tmp_path).close()


def test_unsynced_appends_are_synced_once_the_interval_passed(tmp_path):
    import time

    s = Spool(tmp_path, fsync_interval=0.5)
    s.append(b"k", b"v")  # the first append may sync (interval since open); the second must wait
    s.append(b"k", b"w")
    assert s._dirty
    time.sleep(0.55)
    s.sync_if_due()
    assert not s._dirty
    s.close()
