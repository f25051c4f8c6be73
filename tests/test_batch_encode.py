"""The C capture path gives the events the Python path gives: on generated
kernel records (any header values, paths with NULs, control characters,
non-ASCII and non-UTF-8 bytes, truncated records, loss records),
collector/capture.c's EventEncoder writes the bytes
codec.encode(Enricher.event(record)) writes, and the JSON lines
json.dumps(Enricher.event(record)) writes, byte for byte, and leaves the
same records to the per-record path."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fdpass.collector import batch as B
from fdpass.collector import records as R
from fdpass.collector.enrich import Enricher, HostInfo, WallClock
from fdpass.schemas import codec

pytestmark = pytest.mark.skipif(B._capture is None, reason="collector/capture.c is not built")

MAGICS = [R.SOCKFS_MAGIC, R.PIPEFS_MAGIC, R.ANON_INODE_FS_MAGIC, R.NSFS_MAGIC, R.DMA_BUF_MAGIC, 0xEF53, 0x01021994]
u8, u16 = st.integers(0, 0xFF), st.integers(0, 0xFFFF)
u32, u64 = st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFFFFFFFFFF)
# mostly in range, sometimes past Avro's signed int/long (the Python path's EncodeError)
small32 = st.one_of(st.integers(0, 1 << 20), u32)
small64 = st.one_of(st.integers(0, 1 << 40), u64)


class FixedClock(WallClock):
    def __init__(self, offset_ns: int):
        self.offset_ns = offset_ns

    def to_wall(self, ktime_ns: int) -> int:
        return ktime_ns + self.offset_ns


@st.composite
def records(draw) -> bytes:
    h = R.FdpHeader()
    h.ktime_ns = draw(st.one_of(st.integers(0, 1 << 50), u64))
    h.seq, h.transfer_id = draw(small64), draw(st.one_of(st.just(0), small64))
    h.cgroup_id, h.sock_ino, h.peer_sock_ino, h.file_ino = (draw(small64) for _ in range(4))
    h.ret = draw(st.integers(-(1 << 63), (1 << 63) - 1))
    h.pid = draw(st.sampled_from([os.getpid(), 1, 999_999_999, 0xFFFFFFFF]))
    h.tid, h.ppid, h.uid, h.gid = (draw(small32) for _ in range(4))
    h.mntns_id, h.pidns_id, h.netns_id, h.file_dev = (draw(u32) for _ in range(4))
    h.file_flags = draw(small32)
    h.sb_magic = draw(st.one_of(st.sampled_from(MAGICS), u32))
    h.sock_fd, h.fd = draw(st.integers(-(1 << 31), (1 << 31) - 1)), draw(st.integers(-(1 << 31), (1 << 31) - 1))
    h.fd_index, h.fd_count, h.msg_index = draw(u16), draw(u16), draw(u16)
    h.i_mode = draw(st.one_of(st.sampled_from([0o100644, 0o040755, 0o020666, 0o060660, 0o010600, 0o140777, 0o120777]), u16))
    h.kind = draw(st.sampled_from([R.KIND_FD, R.KIND_FD, R.KIND_FD, R.KIND_LOSS, 7]))
    h.direction, h.syscall, h.abi, h.probe = draw(st.integers(0, 3)), draw(st.integers(0, 9)), draw(st.integers(0, 5)), draw(st.integers(0, 3))
    h.flags, h.ncomp = draw(u8), draw(u8)
    name = st.binary(max_size=15).map(lambda b: b.split(b"\0")[0])
    h.comm, h.parent_comm = draw(st.sampled_from([b"python3", b"tmux: client", b"\xff\xfeodd"])), draw(name)
    path = draw(st.one_of(
        st.lists(st.sampled_from([b"etc", b"passwd", b"", "späß €𝄞".encode(), b"\xff\xc3", b"[eventfd]", b"a b",
                                  b'q"\\\n\t\x01\x7f\x1f']),
                 max_size=6).map(lambda cs: b"".join(c + b"\0" for c in cs)),
        st.binary(max_size=64)))
    h.path_len = draw(st.one_of(st.just(len(path)), u16))
    raw = bytes(h) + path + draw(st.binary(max_size=8))
    if draw(st.integers(0, 30)) == 0:  # shorter than its header: a bad record
        raw = raw[:draw(st.integers(0, R.HEADER_SIZE - 1))]
    return raw


def _encoders(jsonl: bool = False):
    host, clock = HostInfo(), FixedClock(1_700_000_000_000_000_000)
    c = B.BatchEncoder(Enricher(host, clock), prefer_c=True, jsonl=jsonl)
    py = B.BatchEncoder(Enricher(host, clock), prefer_c=False, jsonl=jsonl)
    assert (c.kind, py.kind) == ("c", "python")
    return c, py


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records(), min_size=1, max_size=40), st.booleans())
def test_c_encoder_writes_what_the_python_path_writes(batch, jsonl):
    c, py = _encoders(jsonl)
    assert c.encode(batch) == py.encode(batch)


def test_c_encoder_on_a_real_looking_batch_decodes_to_the_enriched_events():
    c, py = _encoders()
    recs = []
    for i, (flags, magic, path) in enumerate([
        (R.F_PEER | R.F_VERIFIED, 0xEF53, b"shadow\0etc\0"),
        (R.F_DNAME, R.SOCKFS_MAGIC, b"\0"),
        (R.F_DNAME, R.ANON_INODE_FS_MAGIC, b"[eventfd]\0"),
        (R.F_DNAME, 0x01021994, b"memfd:x\0"),
        (R.F_PATH_TRUNC | R.F_DELETED, 0xEF53, b"f\0d\0"),
    ]):
        h = R.FdpHeader(ktime_ns=10**12 + i, seq=i, pid=os.getpid(), tid=os.getpid(), kind=R.KIND_FD,
                        direction=1 + i % 2, syscall=1, flags=flags, sb_magic=magic, i_mode=0o100600,
                        path_len=len(path), comm=b"python3", fd=3 + i, fd_count=1, transfer_id=i)
        recs.append(bytes(h) + path)
    values, n_send, n_recv, others = c.encode(recs)
    assert (n_send, n_recv, others) == (3, 2, [])
    events = [py.enricher.event(*R.decode_bytes(r)) for r in recs]
    assert [codec.decode(v) for v in values] == [codec.decode(codec.encode(e)) for e in events]
    assert [codec.decode(v)["file_path"] for v in values] == [
        "/etc/shadow", "socket:[0]", "anon_inode:[eventfd]", "/memfd:x (deleted)", ".../d/f (deleted)"]


def test_a_record_with_an_unknown_direction_is_never_guessed():
    """Direction 3 is neither SEND nor RECV: both encoders leave it to the per-record path, where
    the enricher refuses it with the reason (the collector counts it in bad_records), instead
    of calling it a SEND."""
    c, py = _encoders()
    h = R.FdpHeader(ktime_ns=10**12, pid=os.getpid(), tid=os.getpid(), kind=R.KIND_FD, direction=3,
                    syscall=1, sb_magic=0xEF53, i_mode=0o100600, path_len=7, comm=b"python3", fd=3, fd_count=1)
    raw = bytes(h) + b"passwd\0"
    for enc in (c, py):
        assert enc.encode([raw]) == ([], 0, 0, [raw])
    with pytest.raises(ValueError, match="unknown direction 3"):
        py.enricher.event(*R.decode_bytes(raw))
