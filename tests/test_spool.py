"""The on-disk spool alone: order, bounds, recovery after a crash (no broker)."""

from __future__ import annotations

import pytest

from fdpass.collector.spool import Spool, SpoolLocked


TOPIC = "fdpass.events"


def drain(spool: Spool) -> list[tuple[bytes, bytes]]:
    out = []
    while (rec := spool.read()) is not None:
        seg, topic, key, value = rec
        assert topic == TOPIC
        out.append((key, value))
        spool.settle(seg)
    return out


def records(n, start=0):
    return [(b"host-%d" % (i % 3), b"value-%06d" % i) for i in range(start, start + n)]


def test_order_across_segments_and_files_deleted_when_delivered(tmp_path):
    s = Spool(tmp_path, segment_bytes=200)
    recs = records(50)
    for k, v in recs:
        assert s.append(k, v, TOPIC)
    assert len(list(tmp_path.glob("*.seg"))) > 3  # several segments
    assert s.pending == 50
    assert drain(s) == recs
    assert s.pending == 0 and s.bytes_used == 0
    assert not list(tmp_path.glob("*.seg"))
    s.close()


def test_records_survive_a_restart_and_prepend_goes_first(tmp_path):
    s = Spool(tmp_path, segment_bytes=300)
    for k, v in records(20, 100):
        s.append(k, v, TOPIC)
    assert s.prepend([(k, v, TOPIC) for k, v in records(5)]) == 5  # older than what was spooled
    s.close()
    s2 = Spool(tmp_path)
    assert s2.pending == 25
    assert drain(s2) == records(5) + records(20, 100)
    s2.close()


def test_unsettled_records_are_replayed_after_restart(tmp_path):
    s = Spool(tmp_path)
    for k, v in records(10):
        s.append(k, v, TOPIC)
    got = [s.read() for _ in range(4)]  # handed out, never delivered
    assert [g[3] for g in got] == [v for _, v in records(4)]
    s.close()
    s2 = Spool(tmp_path)
    assert drain(s2) == records(10)  # at-least-once: the whole segment again
    s2.close()


def test_bound_refuses_records_past_max_bytes(tmp_path):
    s = Spool(tmp_path, max_bytes=1000)
    accepted = sum(s.append(k, v, TOPIC) for k, v in records(100))
    assert 0 < accepted < 100
    assert s.bytes_used <= 1000
    assert drain(s) == records(accepted)
    assert s.append(b"k", b"v", TOPIC)  # room again once delivered
    s.close()


def test_torn_tail_after_crash_keeps_the_good_records(tmp_path):
    s = Spool(tmp_path)
    for k, v in records(10):
        s.append(k, v, TOPIC)
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
        s.append(k, v, TOPIC)
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
    s.append(b"k", b"v", TOPIC)  # the first append may sync (interval since open); the second must wait
    s.append(b"k", b"w", TOPIC)
    assert s._dirty
    time.sleep(0.55)
    s.sync_if_due()
    assert not s._dirty
    s.close()


def test_each_record_keeps_its_topic(tmp_path):
    s = Spool(tmp_path, segment_bytes=120)
    s.append(b"k", b"a", "topic.a")
    s.append(b"k", b"b", "topic.b")
    s.prepend([(b"k", b"p", "topic.p")])
    assert s.topics == {"topic.a", "topic.b", "topic.p"}
    s.close()
    s2 = Spool(tmp_path)  # recovered from disk
    assert s2.topics == {"topic.a", "topic.b", "topic.p"} and s2.untopical == 0
    got = []
    while (rec := s2.read()) is not None:
        got.append(rec[1:])
        s2.settle(rec[0])
    assert got == [("topic.p", b"k", b"p"), ("topic.a", b"k", b"a"), ("topic.b", b"k", b"b")]
    assert s2.topics == set()  # delivered: their segments are gone
    s2.close()


def _format1_segment(path, recs):
    """A segment as fdpass wrote it before the spool kept topics: no header, payload = key length | key | value."""
    import struct
    import zlib

    out = b""
    for key, value in recs:
        payload = struct.pack("<H", len(key)) + key + value
        out += struct.pack("<II", len(payload), zlib.crc32(payload)) + payload
    path.write_bytes(out)


def test_an_old_format_spool_is_still_replayed(tmp_path):
    _format1_segment(tmp_path / f"{10**15:020d}.seg", records(4))
    s = Spool(tmp_path)
    assert s.pending == 4 and s.untopical == 4 and s.topics == set()
    s.append(b"k", b"new", TOPIC)  # new records go behind, in the current format
    got = []
    while (rec := s.read()) is not None:
        got.append(rec[1:])
        s.settle(rec[0])
    assert got == [(None, k, v) for k, v in records(4)] + [(TOPIC, b"k", b"new")]
    s.close()


def test_a_newer_format_segment_is_left_alone(tmp_path):
    seg = tmp_path / f"{10**15:020d}.seg"
    seg.write_bytes(b"FDPSPOOL" + (99).to_bytes(2, "little") + b"\0\0" + b"future records")
    s = Spool(tmp_path)
    assert s.pending == 0 and s.read() is None
    assert s.append(b"k", b"v", TOPIC) and s.prepend([(b"k", b"p", TOPIC)]) == 1  # beside it, not over it
    assert drain(s) == [(b"k", b"p"), (b"k", b"v")]
    s.close()
    assert seg.exists()  # neither replayed nor deleted


def test_rewind_hands_out_the_unsettled_records_again(tmp_path):
    """A dropped producer's replayed records go out again from the first one
    not settled; those settled before stay delivered."""
    s = Spool(tmp_path)
    for k, v in records(6):
        s.append(k, v, TOPIC)
    got = [s.read() for _ in range(4)]
    seg = got[0][0]
    s.settle(seg)
    s.settle(seg)  # the first two delivered
    assert s.rewind(seg) == 2
    assert drain(s) == records(6)[2:]
    s.close()


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 256 KiB tmpfs: the spool's filesystem fills up for real (root only)."""
    from tests.fixtures_disk import small_tmpfs

    with small_tmpfs(tmp_path / "tiny", "256k") as mnt:
        yield mnt


def test_full_filesystem_refuses_records_keeps_the_spool_readable_and_recovers(tiny_fs):
    """No room on the device: appends are refused (and say why), nothing
    half-written stays behind; once space returns appends go on, and every
    accepted record is replayed after a restart, in order."""
    import os

    filler = tiny_fs / "filler"
    filler.write_bytes(b"\0" * (96 << 10))
    s = Spool(tiny_fs / "spool", segment_bytes=32 << 10)
    accepted = []
    for i in range(2000):
        rec = (b"k", b"%06d" % i + os.urandom(9000))  # spans pages: the last write is cut short
        if not s.append(*rec, TOPIC):
            break
        accepted.append(rec)
    assert accepted and len(accepted) < 2000
    assert "no room on the spool's filesystem" in s.refused
    assert not s.append(b"k", b"x" * 9000, TOPIC)  # still full
    filler.unlink()  # space returns
    later = [(b"k", b"later-%d" % i) for i in range(50)]
    for rec in later:
        assert s.append(*rec, TOPIC)
    s.close()
    s2 = Spool(tiny_fs / "spool")
    assert s2.corrupt_records == 0
    assert drain(s2) == accepted + later
    s2.close()
