"""Exactly once into ClickHouse: the protocol, one batch's phases, the replay plan.

The trap. The sink inserts a batch with an insert_deduplication_token
derived from its Kafka offset range, then commits the offsets. If it dies
between insert and commit, the next consumer of the partition re-reads from
the last commit. A batch is closed by rows, bytes or age, so the re-read
batch could come out with another range (fewer messages had arrived, the
timer fired at another moment), hence another token, and ClickHouse would
insert its rows again.

The design. Every batch's range is recorded in `fdpass.sink_batches`, in the
same store, *before* its rows are inserted, and marked done after. A batch
goes through these phases (`Phase`), each step by `ExactlyOnce.store()`
except the last:

    FORMED        cut from the partition's messages (consumer.PartitionBuffer)
    INTENT        (topic, topic id, partition, first, last) recorded in sink_batches,
                  once Kafka has confirmed the topic id (sinks/incarnation.py)
    INSERTED      rows inserted, one INSERT per writer schema version, token
                  "<topic>@<topic id>/<partition>/<first>-<last>/v<version>" (sinks/writer.py)
    DEAD_LETTERED the messages that cannot be stored produced to the dead-letter
                  topic and flushed (acknowledged); skipped when there are none
    DONE          the same range recorded again, phase 'done'
    COMMITTED     offset last+1 committed to Kafka (the consumer)

and, instead: ALREADY_DONE (a re-formed range recorded done by an earlier run:
committed, not inserted again) or ABANDONED (the partition was revoked, or the
sink stops while the store fails: nothing committed).

On partition assignment (start, restart, rebalance) the sink reads the ranges
recorded at or after the committed offset (`BatchLog.pending_many`) and
re-forms exactly those batches before forming any new one (`ReplayPlan`):
messages are accumulated until the recorded last offset and cut there,
whatever rows/bytes/age say. So a re-formed batch always carries the tokens
of its first attempt. What a crash in each phase leaves, and what the next run
does:

    | crash after    | the store holds                        | the next run                                   |
    |----------------|----------------------------------------|------------------------------------------------|
    | FORMED         | nothing of the batch                   | re-reads from the commit and batches anew       |
    | INTENT         | the range, no rows                     | re-forms the range and inserts it               |
    | INSERTED       | the rows (of some day-partitions, if   | re-forms it; ClickHouse drops the repeated      |
    |                | it died inside the INSERT)             | rows by token and completes the missing ones    |
    | DEAD_LETTERED  | rows; the dead letters are in Kafka    | as INSERTED; dead letters may repeat (at least  |
    |                |                                        | once, never lost)                               |
    | DONE           | rows, range marked done                | ALREADY_DONE: commits without inserting, so the |
    |                |                                        | dedup window only covers INTENT..DONE           |
    | COMMITTED      | everything                             | starts after it                                 |

`fdpass run` has no Kafka to replay from: its batches go through `InsertOnly`
(INTENT and DONE are not recorded; a crash loses only what was still in the
process's memory, which no log could re-read). Its tokens are the same
scheme under a topic name unique to that run (`run/<host>/<boot>/<start>`),
so a retry after a lost answer stores nothing twice.

Both keep a failing store's batch where it is with `Retrying`: backoff, the
cause said once and again every 30 s, resumed when the store is back.

Row counts are therefore exact without FINAL or ReplacingMergeTree. The state
is keyed by topic and partition, not by consumer group: the ranges describe
what is in *this table*, whoever wrote it. A failing store (StoreError) keeps
the batch where it is: the writer retries `store()` from the start (recording
an intent twice is harmless, the tokens repeat) and nothing is committed.

Limits (stated, not hidden): a consumer that keeps inserting after it lost
its partitions (stalled beyond max.poll.interval.ms -- a "zombie" -- wakes
up in the middle of a write) can record a range that overlaps the new
owner's. The sink cancels a partition's queued batches as soon as it learns
of the revocation, and overlapping ranges are logged when read back, but
ClickHouse offers no fencing to make the overlap impossible. Ranges are kept
30 days (TTL), far beyond any restart. Surviving a power cut (not only a
kill) needs fsync_after_insert on both tables, ClickHouse's usual trade-off.
"""

from __future__ import annotations

import bisect
import enum
import logging
import os
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fdpass.schemas.clickhouse import STATE_TABLE

log = logging.getLogger("fdpass.sink")


@dataclass
class Range:
    first: int
    last: int
    done: bool
    incarnation: str = ""  # the topic id it was recorded under ('' before ids were recorded)


def _quote(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def token(topic: str, partition: int, first: int, last: int, suffix: str = "", incarnation: str = "") -> str:
    """The insert deduplication token of a range; with the topic's incarnation (its topic id,
    sinks/incarnation.py) when the range was recorded with one, so a recreated topic's offsets
    never match the old topic's tokens."""
    topic = f"{topic}@{incarnation}" if incarnation else topic
    return f"{topic}/{partition}/{first}-{last}{suffix}"


class BatchLog:
    """Reads and writes the batch ranges of one topic in `<db>.sink_batches`."""

    def __init__(self, client, database: str, topic: str):
        self.client = client
        self.table = f"{database}.{STATE_TABLE}"
        self.topic = topic
        self.sink_id = f"{socket.gethostname()}:{os.getpid()}"

    def _record(self, partition: int, first: int, last: int, messages: int, phase: str, incarnation: str) -> None:
        # A literal one-row INSERT: client.insert() would first DESCRIBE the
        # table on every call, and bound parameters cost ~2x on chDB; every
        # value is an int or a quoted string we produce. The setting is in the
        # statement: given as `settings=`, clickhouse-connect's chDB backend
        # reads, sets and restores it around the query (three more queries,
        # measured 24 instead of 10 ms per record).
        self.client.command(
            f"INSERT INTO {self.table} (topic, topic_id, partition, first_offset, last_offset, messages, phase, sink) "
            "SETTINGS insert_distributed_sync = 1 "  # a cluster: visible to every sink on return
            f"VALUES ({_quote(self.topic)}, {_quote(incarnation)}, {int(partition)}, {int(first)}, {int(last)}, "
            f"{int(messages)}, {_quote(phase)}, {_quote(self.sink_id)})",
        )

    def intent(self, partition: int, first: int, last: int, messages: int, incarnation: str = "") -> None:
        self._record(partition, first, last, messages, "intent", incarnation)

    def done(self, partition: int, first: int, last: int, messages: int, incarnation: str = "") -> None:
        self._record(partition, first, last, messages, "done", incarnation)

    def pending(self, partition: int, from_offset: int, incarnation: str = "") -> list[Range]:
        """Ranges recorded at or after from_offset, in offset order, overlaps removed."""
        return self.pending_many({partition: from_offset}, incarnation)[partition]

    def pending_many(self, starts: dict[int, int], incarnation: str = "") -> dict[int, list[Range]]:
        """pending() of every partition of an assignment ({partition: from_offset}) in one query
        (each query costs chDB 5-50 ms; an assignment waits for them).

        Only the ranges of this incarnation of the topic (its topic id,
        sinks/incarnation.py) count: another incarnation's offsets are other
        messages. Ranges recorded before ids were (topic_id '') count as this
        incarnation's while the partition's window holds no range with an id:
        after an upgrade they are the last run's unfinished batches and are
        re-formed first (keeping their id-less tokens); once a range with an
        id follows them they are history, perhaps of a topic since recreated."""
        where = " OR ".join(f"(partition = {int(p)} AND last_offset >= {int(o)})" for p, o in starts.items())
        rows = self.client.query(
            f"SELECT partition, first_offset, last_offset, max(phase = 'done'), topic_id FROM {self.table} "
            f"WHERE topic = {_quote(self.topic)} AND ({where}) "
            "GROUP BY partition, topic_id, first_offset, last_offset ORDER BY partition, first_offset, last_offset",
        ).result_rows if starts else []
        with_ids = {int(r[0]) for r in rows if r[4]}
        out: dict[int, list[Range]] = {p: [] for p in starts}
        for partition, first, last, done, topic_id in rows:
            if topic_id != incarnation and (topic_id or int(partition) in with_ids):
                continue  # another incarnation's (see above)
            ranges = out[int(partition)]
            if ranges and first <= ranges[-1].last:
                # Two sinks recorded overlapping ranges (see "Limits" above).
                log.warning("partition %d: recorded batch %d-%d overlaps %d-%d; replaying the first only",
                            partition, first, last, ranges[-1].first, ranges[-1].last)
                continue
            ranges.append(Range(int(first), int(last), bool(done), topic_id))
        return out


class StoreError(RuntimeError):
    """The store refused or failed an insert for a reason that is not the data's."""


def short(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:300]


class Phase(enum.Enum):
    """Where a batch is in the protocol (see the module docstring)."""

    FORMED = "formed"
    INTENT = "intent"
    INSERTED = "inserted"
    DEAD_LETTERED = "dead_lettered"
    DONE = "done"
    COMMITTED = "committed"
    ALREADY_DONE = "already_done"
    ABANDONED = "abandoned"


@dataclass
class Batch:
    """One offset range of one partition: what the protocol stores as a unit."""

    topic: str
    partition: int
    first: int
    last: int
    # What is kept of each message, in offset order (offsets may have gaps:
    # compaction, transaction markers).
    values: list  # bytes, or None for a message without a value
    keys: list
    offsets: Sequence[int]
    phase: Phase = Phase.FORMED
    reformed: bool = False  # the range was recorded by an earlier run (ReplayPlan)
    # The topic's incarnation (topic id) the messages were read from; its
    # tokens and batch-log rows carry it (sinks/incarnation.py).
    incarnation: str = ""
    legacy: bool = False  # re-formed from a range recorded without an id: its tokens and rows keep none
    cut_at: float = 0.0  # time.monotonic() when cut: every message was fetched before

    @property
    def recorded_id(self) -> str:
        """The topic id its tokens and batch-log rows carry."""
        return "" if self.legacy else self.incarnation

    # Set from the consumer thread when the partition is revoked or lost:
    # a request, not a phase (the writer thread owns `phase`).
    cancelled: bool = False
    nbytes: int = 0
    rows: int = 0  # inserted
    dead: int = 0  # dead-lettered

    @property
    def stored(self) -> bool:
        """Everything of the range is in the store: its offsets may be committed."""
        return self.phase in (Phase.DONE, Phase.ALREADY_DONE)

    def describe(self) -> str:
        return f"{self.topic}[{self.partition}] offsets {self.first}-{self.last} ({len(self.values)} msgs)"

    def message(self, i: int):
        """Message i as the dead-letter producer forwards it (key and value untouched)."""
        from confluent_kafka import Message

        return Message(topic=self.topic, partition=self.partition, offset=self.offsets[i], key=self.keys[i],
                       value=self.values[i])


class ReplayPlan:
    """The ranges recorded for one partition that must be re-formed exactly, in offset order."""

    def __init__(self, topic: str, partition: int, ranges: list[Range]):
        self.topic, self.partition = topic, partition
        self.ranges = deque(ranges)

    def cut(self, offsets: Sequence[int], force: bool, full) -> tuple[int, Range | None] | None:
        """Where the next batch must end while recorded ranges remain.

        offsets: the buffered messages' (not empty); full(n): would n messages
        make a batch by rows/bytes/age. Returns (n, range) to cut the first n
        messages as that recorded range, (n, None) to cut n unrecorded ones
        that come before it, (0, None) to wait for more, or None once nothing
        recorded is left (batch as usual)."""
        while self.ranges:
            r = self.ranges[0]
            head = offsets[0]
            if head > r.last:
                # The recorded range's messages are gone (retention ran past them).
                log.warning("%s[%d]: recorded batch %d-%d is no longer in Kafka (next offset %d); skipped",
                            self.topic, self.partition, r.first, r.last, head)
                self.ranges.popleft()
                continue
            if head < r.first:
                # Unrecorded messages before a recorded range: a batch of their
                # own that must end before the range starts.
                n = bisect.bisect_left(offsets, r.first)
                return (n, None) if n < len(offsets) or force or full(n) else (0, None)
            if offsets[-1] >= r.last:
                self.ranges.popleft()
                return bisect.bisect_right(offsets, r.last), r
            # Wait for the rest of the recorded range. On shutdown the partial
            # range is simply not written and re-formed by the next run.
            return 0, None
        return None


class ExactlyOnce:
    """Stores batches by the protocol: one per writer thread (its own store client's BatchLog).

    insert(batch) -> (rows, dead) inserts a batch's rows under its tokens and
    lists the messages that cannot be stored as (index, reason, detail)
    (sinks/writer.py: Writer.insert); it raises StoreError when the store fails."""

    def __init__(self, batch_log: BatchLog, dead_letters, insert, confirm=None):
        self.batch_log = batch_log
        self.dlq = dead_letters
        self.insert = insert
        # confirm(batch): returns if the topic is still the incarnation the batch was read from,
        # raises StoreError if Kafka cannot say now, TopicReplaced if not (sinks/incarnation.py).
        self.confirm = confirm

    def store(self, batch: Batch) -> None:
        """Take a batch to DONE (or leave it ALREADY_DONE), or raise StoreError: then nothing may be committed.
        TopicReplaced (sinks/incarnation.py): the batch must be dropped, neither stored nor committed."""
        if batch.phase is Phase.ALREADY_DONE:
            return
        if self.confirm is not None:
            self.confirm(batch)
        n = len(batch.values)
        try:
            self.batch_log.intent(batch.partition, batch.first, batch.last, n, batch.recorded_id)
        except Exception as e:
            raise StoreError(f"recording the batch range failed: {short(e)}") from e
        batch.phase = Phase.INTENT
        rows, dead = self.insert(batch)
        batch.phase = Phase.INSERTED
        if dead:
            for i, reason, detail in dead:
                self.dlq.send(batch.message(i), reason, detail)
            try:
                self.dlq.flush()
            except Exception as e:
                raise StoreError(f"dead letters not delivered: {e}") from e
            batch.phase = Phase.DEAD_LETTERED
        try:
            self.batch_log.done(batch.partition, batch.first, batch.last, n, batch.recorded_id)
        except Exception as e:
            raise StoreError(f"marking the batch done failed: {short(e)}") from e
        batch.rows, batch.dead = rows, len(dead)
        batch.phase = Phase.DONE


class InsertOnly:
    """Stores batches that have no replay source (`fdpass run`): insert under the batch's tokens, no range log.

    rejected(batch, dead) is told about the messages that cannot be stored
    (there is no dead-letter topic without Kafka)."""

    def __init__(self, insert, rejected: Callable[[Batch, list], None]):
        self.insert = insert
        self.rejected = rejected

    def store(self, batch: Batch) -> None:
        rows, dead = self.insert(batch)
        batch.phase = Phase.INSERTED
        if dead:
            self.rejected(batch, dead)
        batch.rows, batch.dead = rows, len(dead)
        batch.phase = Phase.DONE


def backoff_delays(start: float = 0.5, cap: float = 30.0):
    """0.5, 1, 2, 4 ... capped: how long to wait between attempts at a failing store."""
    d = start
    while True:
        yield d
        d = min(cap, d * 2)


# A full disk under the store: ClickHouse's NOT_ENOUGH_SPACE (Code 243: it could not reserve room for a
# part), or the OS's ENOSPC / EDQUOT passed through.
_DISK_FULL = re.compile(r"Code: 243\b|NOT_ENOUGH_SPACE|No space left on device|Disk quota exceeded")


def is_disk_full(text: str) -> bool:
    return bool(_DISK_FULL.search(text))


class Retrying:
    """Takes one batch at a time through a protocol's store(), retrying while the store fails.

    A StoreError keeps the batch where it is (nothing committed, nothing
    dropped) and is retried with backoff until it succeeds or `give_up` is
    set. The cause is logged at the first failure and then every
    REPEAT_S seconds (a store that is out of disk for an hour says so 120
    times, not 3600), and once more when the store is back.

    A full disk (is_disk_full) is named as such and retried every
    DISK_FULL_RETRY_S instead of with the backoff (up to 30 s): space that
    comes back (a file deleted, a volume grown) is used at once, and a
    refused reservation costs the store nothing (docs/reliability.md)."""

    REPEAT_S = 30.0
    DISK_FULL_RETRY_S = 1.0

    def __init__(self, protocol, give_up: threading.Event, given_up_means: str):
        self.protocol = protocol
        self.give_up = give_up
        self.given_up_means = given_up_means
        self.retrying = False
        self.error: str | None = None  # the last failure's cause while retrying
        self.failures = 0  # store failures over the object's life

    def store(self, b: Batch) -> bool:
        """True when the batch is stored; False when given up (then nothing of it may be committed)."""
        delays = backoff_delays()
        attempt = 0
        first_failure = said = 0.0
        while True:
            try:
                self.protocol.store(b)
            except StoreError as e:
                attempt += 1
                self.failures += 1
                self.retrying, self.error = True, str(e)
                now = time.monotonic()
                if b.cancelled or self.give_up.is_set():
                    log.warning("%s given up after %d failed attempts (%s): %s",
                                b.describe(), attempt, self.given_up_means, e)
                    self.retrying = False
                    return False
                full = is_disk_full(str(e))
                delay = self.DISK_FULL_RETRY_S if full else next(delays)
                if attempt == 1:
                    first_failure = said = now
                    log.warning("%s not stored: %s%s -- nothing is committed or dropped; retrying %s "
                                "(said again every %.0f s while it lasts)", b.describe(), e,
                                " (the store's disk is full: free space or grow the volume)" if full else "",
                                f"every {delay:.0f} s" if full else "with backoff", self.REPEAT_S)
                elif now - said >= self.REPEAT_S:
                    said = now
                    log.warning("%s still not stored after %d attempts over %.0f s: %s",
                                b.describe(), attempt, now - first_failure, e)
                self.give_up.wait(delay)
                continue
            except BaseException:  # not the store's failure (consumer.py sorts it out)
                self.retrying, self.error = False, None
                raise
            if attempt:
                log.info("store is back: %s stored after %d failed attempts over %.0f s",
                         b.describe(), attempt, time.monotonic() - first_failure)
            self.retrying, self.error = False, None
            return True
