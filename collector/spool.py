"""On-disk spool: where events wait while Kafka cannot take them.

Layout: a directory of segment files `<20-digit id>.seg`, replayed in id
order. Each segment is append-only: a 12-byte header, then records.

    header   "FDPSPOOL" | u16 format (2) | u16 0
    record   u32 length | u32 CRC-32 of payload |
             payload = u16 topic length | topic | u16 key length | key | value

(little-endian). Each record keeps the topic it was meant for, so a collector
restarted with another --topic still replays it there. Format 1 (fdpass
before the topic was kept) has no header and no topic in its records
(payload = u16 key length | key | value); such segments are still read, and
their records have no topic (the publisher sends them to its own). No
format-1 record can start with the header: its length would be 1.4 GB.

A segment file is deleted only once every record in it has
been delivered to Kafka (the publisher reports each delivery back), so a
crash at any point loses nothing that reached the spool; it may replay
records that were delivered just before the crash (at-least-once; the
sink drops duplicates by event_id).

Ordering: records are read back in exactly the order they were appended.
`prepend()` writes a segment in front of all others, for the events that
were still inside the Kafka client when the publisher closed: they are older
than anything in the spool.

fsync policy: records go to the kernel with one write(2) each (a process
crash loses nothing); the file is fsync'ed when a segment is sealed, on
close, and otherwise once per `fsync_interval` seconds (default 1 s) while
there is unsynced data (on append, and from the publisher's background
thread via sync_if_due), so a power loss or kernel crash loses at most about
the last second of spooled events. The directory is fsync'ed when segments are created.

Bound: `max_bytes` over all segment files. When an append would pass it, or
the filesystem has no room (ENOSPC, EDQUOT: whatever was half-written is cut
off again, so the segment stays readable), the spool refuses the record
(append returns False, `refused` says why) and the caller drops it:
drop-newest, because the oldest events are the ones a forensic log can least
afford to lose, and dropping newest keeps what is spooled contiguous.

A torn record at the end of a segment (a crash mid-write) or a CRC mismatch
ends that segment's replay; it is counted in `corrupt_records` and logged.

One process per spool directory: an flock on `lock` enforces it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fdpass.spool")

_HEAD = struct.Struct("<II")  # length, crc32
_KEYLEN = struct.Struct("<H")  # also the topic's length
_MAGIC = b"FDPSPOOL"
FORMAT = 2
_SEG_HEADER = _MAGIC + struct.pack("<HH", FORMAT, 0)
_FIRST_ID = 10**15  # room below for prepend()
_SUFFIX = ".seg"
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


class SpoolLocked(RuntimeError):
    pass


@dataclass
class Segment:
    id: int
    path: Path
    size: int = 0  # bytes written (appends) or found (recovery)
    records: int = 0  # records in the file
    read_offset: int = 0  # next record to hand out
    handed: int = 0  # records handed out by read()
    done: int = 0  # handed-out records whose delivery is settled
    sealed: bool = False  # no more appends
    corrupt_at: int | None = None  # offset of a bad record: replay ends there
    format: int = FORMAT  # 1: no header, records without a topic
    topics: frozenset = frozenset()  # topics of its records (format 2)

    @property
    def fully_read(self) -> bool:
        end = self.corrupt_at if self.corrupt_at is not None else self.size
        return self.read_offset >= end

    @property
    def unsettled(self) -> int:
        """Records of this segment not yet delivered (unread + in flight)."""
        return self.records - self.done


def _encode_record(key: bytes, value: bytes, topic: str) -> bytes:
    t = topic.encode()
    payload = _KEYLEN.pack(len(t)) + t + _KEYLEN.pack(len(key)) + key + value
    return _HEAD.pack(len(payload), zlib.crc32(payload)) + payload


def _decode_payload(payload: bytes, fmt: int) -> tuple[str | None, bytes, bytes]:
    """(topic or None for format 1, key, value) of a record's payload."""
    topic, off = None, 0
    if fmt >= 2:
        (tlen,) = _KEYLEN.unpack_from(payload)
        topic = payload[_KEYLEN.size:_KEYLEN.size + tlen].decode()
        off = _KEYLEN.size + tlen
    (klen,) = _KEYLEN.unpack_from(payload, off)
    start = off + _KEYLEN.size
    return topic, payload[start:start + klen], payload[start + klen:]


class Spool:
    def __init__(self, directory: str | os.PathLike, max_bytes: int = 1 << 30,
                 segment_bytes: int = 16 << 20, fsync_interval: float = 1.0):
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync_interval = fsync_interval
        self.corrupt_records = 0
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise OSError(f"cannot use spool directory {self.dir}: {exc.strerror}") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolLocked(f"spool directory {self.dir} is in use by another fdpass process") from None
        self._segments: list[Segment] = []  # in replay order
        self._write_fd: int | None = None  # fd of the tail segment while it takes appends
        self._read_fd: int | None = None
        self._read_seg: Segment | None = None
        self._last_fsync = time.monotonic()
        self._dirty = False
        self._bytes = 0  # sum of the segments' sizes
        self._foreign_ids: list[int] = []  # segments of a newer format, left on disk: ids not to reuse
        self.refused = ""  # why the last refused append was refused: "full" or the filesystem's error
        self._recover()

    # --- recovery ------------------------------------------------------------
    def _recover(self) -> None:
        for path in sorted(self.dir.glob("*" + _SUFFIX)):
            try:
                seg_id = int(path.stem)
            except ValueError:
                continue
            seg = Segment(seg_id, path, sealed=True)
            self._scan(seg)
            if seg.format > FORMAT:
                self._foreign_ids.append(seg_id)  # a newer fdpass's: left on disk, untouched
                continue
            if seg.records == 0 and seg.corrupt_at in (None, 0):
                path.unlink()
                continue
            self._segments.append(seg)
            self._bytes += seg.size
        if self._segments:
            log.info("spool %s: %d events left by an earlier run will be replayed first",
                     self.dir, self.pending)

    def _scan(self, seg: Segment) -> None:
        data = seg.path.read_bytes()
        seg.size = len(data)
        off = 0
        if data.startswith(_MAGIC):
            (seg.format,) = struct.unpack_from("<H", data, len(_MAGIC))
            if seg.format > FORMAT:
                log.error("spool %s: segment format %d is newer than this fdpass reads (%d): left on disk, "
                          "unread", seg.path, seg.format, FORMAT)
                return
            off = seg.read_offset = len(_SEG_HEADER)
        else:
            seg.format = 1
        topics = set()
        while off < len(data):
            rec_end = self._check(data, off)
            if rec_end is None:
                seg.corrupt_at = off
                self.corrupt_records += 1
                log.warning("spool %s: torn or corrupt record at byte %d of %d; the rest of this "
                            "segment cannot be replayed", seg.path, off, len(data))
                break
            seg.records += 1
            if seg.format >= 2:
                topics.add(_decode_payload(data[off + _HEAD.size:rec_end], seg.format)[0])
            off = rec_end
        seg.topics = frozenset(topics)

    @staticmethod
    def _check(data: bytes, off: int) -> int | None:
        """End offset of the valid record at `off`, or None if it is torn/corrupt."""
        if off + _HEAD.size > len(data):
            return None
        length, crc = _HEAD.unpack_from(data, off)
        start = off + _HEAD.size
        end = start + length
        if end > len(data) or length < _KEYLEN.size or zlib.crc32(data[start:end]) != crc:
            return None
        return end

    # --- size ----------------------------------------------------------------
    @property
    def bytes_used(self) -> int:
        return self._bytes

    @property
    def pending(self) -> int:
        """Records in the spool not yet delivered (unread or in flight)."""
        return sum(s.unsettled for s in self._segments)

    @property
    def unread(self) -> int:
        """Records not yet handed out by read()."""
        return sum(s.records - s.handed for s in self._segments)

    def has_unread(self) -> bool:
        return any(not s.fully_read for s in self._segments)

    @property
    def topics(self) -> set[str]:
        """Topics the spooled records are meant for (format-2 segments)."""
        return set().union(*(s.topics for s in self._segments))

    @property
    def untopical(self) -> int:
        """Spooled records of format 1, which name no topic."""
        return sum(s.unsettled for s in self._segments if s.format < 2)

    # --- writing ---------------------------------------------------------------
    @staticmethod
    def _write_all(fd: int, data: bytes, size: int) -> None:
        """Write data at the end of a file of `size` bytes, all or nothing: on a
        failure, what was half-written is cut off so no torn record is left in
        front of later ones."""
        try:
            done = os.write(fd, data)
            if done != len(data):  # a short write: the filesystem filled up mid-record
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            os.ftruncate(fd, size)
            raise

    def _new_segment(self, seg_id: int, front: bool = False) -> tuple[Segment, int]:
        path = self.dir / f"{seg_id:020d}{_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            self._write_all(fd, _SEG_HEADER, 0)
        except OSError:
            os.close(fd)
            path.unlink()
            raise
        seg = Segment(seg_id, path, size=len(_SEG_HEADER), read_offset=len(_SEG_HEADER))
        self._bytes += seg.size
        if front:
            self._segments.insert(0, seg)
        else:
            self._segments.append(seg)
        self._fsync_dir()
        return seg, fd

    def _fsync_dir(self) -> None:
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _tail_for_append(self, nbytes: int) -> Segment:
        tail = self._segments[-1] if self._segments else None
        if tail is not None and not tail.sealed and self._write_fd is not None:
            if tail.size + nbytes <= self.segment_bytes or tail.records == 0:
                return tail
            self._seal_tail()
        next_id = max([s.id + 1 for s in self._segments[-1:]] + [i + 1 for i in self._foreign_ids] + [_FIRST_ID])
        seg, self._write_fd = self._new_segment(next_id)
        return seg

    def _seal_tail(self) -> None:
        if self._write_fd is not None:
            os.fsync(self._write_fd)
            os.close(self._write_fd)
            self._write_fd = None
            self._dirty = False
        if self._segments:
            self._segments[-1].sealed = True

    def append(self, key: bytes, value: bytes, topic: str) -> bool:
        """Add one record, for `topic`, at the end. False (and nothing written) when the spool is
        full or its filesystem has no room (`refused` says which)."""
        rec = _encode_record(key, value, topic)
        if self.bytes_used + len(rec) + len(_SEG_HEADER) > self.max_bytes:
            self.refused = f"spool full ({self.bytes_used} of {self.max_bytes} bytes)"
            return False
        try:
            seg = self._tail_for_append(len(rec))
            self._write_all(self._write_fd, rec, seg.size)
        except OSError as exc:
            if exc.errno not in _NO_ROOM:
                raise
            self.refused = f"no room on the spool's filesystem ({exc.strerror})"
            return False
        if topic not in seg.topics:
            seg.topics = seg.topics | {topic}
        seg.size += len(rec)
        self._bytes += len(rec)
        seg.records += 1
        self._dirty = True
        now = time.monotonic()
        if now - self._last_fsync >= self.fsync_interval:
            os.fsync(self._write_fd)
            self._last_fsync = now
            self._dirty = False
        return True

    def prepend(self, records: list[tuple[bytes, bytes, str]]) -> int:
        """Write `records` (key, value, topic) as a new segment in front of all others; returns how many fit.

        The bound applies here too: what does not fit is not written (the
        caller counts it as dropped).
        """
        if not records:
            return 0
        front_id = min([s.id - 1 for s in self._segments[:1]] + [i - 1 for i in self._foreign_ids] + [_FIRST_ID - 1])
        blobs = []
        room = self.max_bytes - self.bytes_used - len(_SEG_HEADER)
        for key, value, topic in records:
            rec = _encode_record(key, value, topic)
            if len(rec) > room:
                break
            room -= len(rec)
            blobs.append(rec)
        if not blobs:
            return 0
        data = b"".join(blobs)
        try:
            seg, fd = self._new_segment(front_id, front=True)
        except OSError as exc:
            if exc.errno not in _NO_ROOM:
                raise
            self.refused = f"no room on the spool's filesystem ({exc.strerror})"
            return 0
        try:
            self._write_all(fd, data, len(_SEG_HEADER))
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in _NO_ROOM:
                raise
            self.refused = f"no room on the spool's filesystem ({exc.strerror})"
            os.close(fd)
            seg.path.unlink()
            self._segments.remove(seg)
            self._bytes -= seg.size
            return 0
        os.close(fd)
        seg.size += len(data)
        self._bytes += len(data)
        seg.records = len(blobs)
        seg.topics = frozenset(topic for _k, _v, topic in records[:len(blobs)])
        seg.sealed = True
        return len(blobs)

    def sync_if_due(self) -> None:
        """fsync appended data older than `fsync_interval` (the publisher calls
        this periodically, so the last records of a burst are synced too)."""
        if self._dirty and self._write_fd is not None and time.monotonic() - self._last_fsync >= self.fsync_interval:
            os.fsync(self._write_fd)
            self._last_fsync = time.monotonic()
            self._dirty = False

    # --- reading ---------------------------------------------------------------
    def read(self) -> tuple[Segment, str | None, bytes, bytes] | None:
        """The next record not yet handed out, as (segment, topic, key, value); None if none.
        topic is None for a format-1 record (it names none).

        Call `settle(segment)` once Kafka has its delivery (or has failed it
        for good); a segment's file goes away when all its records are settled.
        """
        for seg in self._segments:
            if seg.fully_read:
                continue
            if self._read_seg is not seg:
                if self._read_fd is not None:
                    os.close(self._read_fd)
                self._read_fd = os.open(seg.path, os.O_RDONLY)
                self._read_seg = seg
            head = os.pread(self._read_fd, _HEAD.size, seg.read_offset)
            length, crc = _HEAD.unpack(head)
            payload = os.pread(self._read_fd, length, seg.read_offset + _HEAD.size)
            if len(payload) != length or zlib.crc32(payload) != crc:
                # Only recovered segments can be torn; they were scanned, so
                # this means the file changed under us: stop replaying it.
                seg.corrupt_at = seg.read_offset
                self.corrupt_records += 1
                log.error("spool %s: record at byte %d changed on disk; skipping the rest",
                          seg.path, seg.read_offset)
                seg.records = seg.handed
                self._maybe_delete(seg)
                continue
            seg.read_offset += _HEAD.size + length
            seg.handed += 1
            topic, key, value = _decode_payload(payload, seg.format)
            if seg.fully_read and not seg.sealed:
                # The writer is caught up: seal so the next outage starts a new
                # segment and this one can be deleted once delivered.
                self._seal_tail()
            return seg, topic, key, value
        return None

    def rewind(self, seg: Segment) -> int:
        """Hand a segment's unsettled records out again (their delivery is
        unknown: the producer sending them was dropped). Records settle in
        order, so they are the ones from index `done` on; the settled ones
        before stay delivered. Returns how many are handed out again."""
        again = seg.handed - seg.done
        off = len(_SEG_HEADER) if seg.format >= 2 else 0
        with open(seg.path, "rb") as f:
            for _ in range(seg.done):
                length, _crc = _HEAD.unpack(os.pread(f.fileno(), _HEAD.size, off))
                off += _HEAD.size + length
        seg.read_offset = off
        seg.handed = seg.done
        return again

    def settle(self, seg: Segment) -> None:
        seg.done += 1
        self._maybe_delete(seg)

    def _maybe_delete(self, seg: Segment) -> None:
        if seg.sealed and seg.fully_read and seg.done >= seg.handed and seg in self._segments:
            if seg.corrupt_at is None and seg.done < seg.records:
                return
            if self._read_seg is seg and self._read_fd is not None:
                os.close(self._read_fd)
                self._read_fd = None
                self._read_seg = None
            try:
                seg.path.unlink()
            except FileNotFoundError:
                pass
            self._segments.remove(seg)
            self._bytes -= seg.size

    def close(self) -> None:
        """fsync and release the directory; what is left is replayed by the next run."""
        if self._write_fd is not None:
            os.fsync(self._write_fd)
            os.close(self._write_fd)
            self._write_fd = None
        if self._segments:
            self._segments[-1].sealed = True
        if self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
