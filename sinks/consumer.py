"""The sink's consumer loop: Kafka partitions -> batches -> writer thread -> commit.

Threads and who owns what:
- the consumer thread (the caller of `Sink.run`) owns the Kafka consumer:
  it polls, keeps one buffer per assigned partition, cuts batches (by rows,
  bytes, age -- or exactly at a recorded range, see exactly_once.py), hands them to
  a writer thread and commits each batch's offsets once the writer reports
  it stored. All consumer calls, commits and rebalance callbacks happen here.
- writer threads (2 by default; partition p always goes to writer p % n, so
  a partition's batches are stored and committed in offset order) insert
  batches one at a time and retry with backoff while the store fails.
  ClickHouse (chDB too) releases the GIL while it parses and writes, so
  consuming overlaps with inserting, and two inserts with each other.
- backpressure: at most `max_inflight` batches between cut and commit; when
  the writers are behind the loop waits for them; when one is retrying a
  dead store every assigned partition is paused and the loop keeps polling
  so the group membership stays alive, and nothing new is read -- so
  nothing is committed and nothing is dropped.

Rebalance: on revocation, batches of the revoked partitions not yet started
are cancelled, a batch being written is finished (or, while retrying,
abandoned), finished ones are committed while the partitions are still ours,
and open buffers are dropped: the next owner re-reads them from the
committed offset, re-forming any recorded range exactly (exactly_once.py).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from itertools import groupby

from confluent_kafka import Message

from fdpass import defaults, kafka
from fdpass.errors import UserError
from fdpass.sinks.exactly_once import (Batch, BatchLog, ExactlyOnce, Phase, Range, ReplayPlan, Retrying,
                                      backoff_delays, short)
from fdpass.sinks.writer import Writer

log = logging.getLogger("fdpass.sink")

def tune_gc() -> None:
    """Process-wide: fewer cyclic-GC passes (for the sink's process, not a library caller's).

    The sink allocates one Message object per event and holds up to a few
    batches of them; with the default thresholds the cyclic GC rescans those
    over and over (measured: ~15 % of the sink's CPU). They hold no cycles.
    """
    import gc

    gc.freeze()
    gc.set_threshold(100_000, 50, 50)


@dataclass
class SinkConfig:
    bootstrap: str
    topic: str = defaults.TOPIC
    group: str = "fdpass-sink"
    dlq_topic: str | None = None  # default: <topic>.dlq
    # Chosen with bench/bench_sink.py (2-CPU VM, 366-byte events, Native
    # inserts, medians of 3 runs): 100k-row batches 273k rows/s, 50k 247k,
    # 20k 185k (each insert pays a fixed cost: a part per day partition, two
    # state rows, a commit). 32 MiB caps a batch of large events (~92k of
    # these); 1 s bounds the latency when traffic is light.
    batch_rows: int = 100_000
    batch_bytes: int = 32 << 20
    batch_age: float = 1.0
    # Writer threads; a partition always goes to the same one (partition % n),
    # so each partition's batches are stored and committed in offset order.
    # ClickHouse and the transcoder release the GIL while they work, so two
    # writers keep both cores of a small machine busy (4 measured slower:
    # 222k against 273k rows/s).
    writers: int = 2
    max_inflight: int = 4  # batches cut but not yet committed, over all writers
    status_every: float = 10.0
    kafka_conf: dict = field(default_factory=dict)  # fdpass.kafka.properties(); overrides the defaults
    table: str = "events"
    ttl_days: int | None = None  # applied when the table is created
    # Insert Native blocks made by the C transcoder (sinks/conversion.py);
    # False: Avro containers, the path taken when the extension is not built.
    native: bool = True


@dataclass
class Limits:
    rows: int
    nbytes: int
    age: float


# The consumer thread keeps what a batch needs of each message -- value, key,
# offset -- and lets the Message objects go right after consume(): taken
# while the messages are still in the CPU cache, by C loops (map, groupby,
# sum over these method descriptors), these cost a fraction of touching 100k
# Message objects again later (~200 ns each in cache misses alone), and the
# bytes and int arrays kept are not tracked by the cyclic GC as Messages are.
_ERROR, _PARTITION = Message.error, Message.partition
_VALUE, _KEY, _OFFSET = Message.value, Message.key, Message.offset


class PartitionBuffer:
    """Messages of one partition not yet cut into a batch, plus the ranges to re-form."""

    __slots__ = ("topic", "partition", "values", "keys", "offsets", "chunks", "nbytes", "since", "plan")

    def __init__(self, topic: str, partition: int, replay: list[Range]):
        self.topic = topic
        self.partition = partition
        self.values: list = []
        self.keys: list = []
        self.offsets = array("q")
        self.chunks: deque[list[int]] = deque()  # [messages, bytes] of each add_many, for exact byte counts
        self.nbytes = 0
        self.since = 0.0
        self.plan = ReplayPlan(topic, partition, replay)

    def add_many(self, msgs: list, now: float) -> None:
        """Messages of this partition, in offset order."""
        if not self.values:
            self.since = now
        nbytes = sum(map(len, msgs))  # Message.__len__: the value's length, 0 for none
        self.values.extend(map(_VALUE, msgs))
        self.keys.extend(map(_KEY, msgs))
        self.offsets.extend(map(_OFFSET, msgs))
        self.chunks.append([len(msgs), nbytes])
        self.nbytes += nbytes

    def _take_bytes(self, n: int) -> int:
        """Bytes of the first n messages, from the chunk counts (only a cut chunk is summed again)."""
        total, left = 0, n
        while left:
            chunk = self.chunks[0]
            if chunk[0] <= left:
                total += chunk[1]
                left -= chunk[0]
                self.chunks.popleft()
            else:
                part = sum(map(len, filter(None, self.values[n - left:n])))
                chunk[0] -= left
                chunk[1] -= part
                total += part
                left = 0
        return total

    def _take(self, n: int, now: float, rng: Range | None = None) -> Batch:
        nbytes = self._take_bytes(n)
        values, keys, offsets = self.values[:n], self.keys[:n], self.offsets[:n]
        del self.values[:n], self.keys[:n], self.offsets[:n]
        self.nbytes -= nbytes
        self.since = now
        if rng is not None:
            first, last = rng.first, rng.last
        else:
            first, last = offsets[0], offsets[-1]
        return Batch(self.topic, self.partition, first, last, values, keys, offsets,
                     phase=Phase.ALREADY_DONE if rng and rng.done else Phase.FORMED, reformed=rng is not None,
                     nbytes=nbytes)

    def cut(self, now: float, limits: Limits, force: bool = False) -> Batch | None:
        offsets = self.offsets
        if not offsets:
            return None
        step = self.plan.cut(offsets, force, lambda n: self._full(n, now, limits))
        if step is not None:
            n, rng = step
            if not n:
                return None
            return self._take(n if rng else min(n, limits.rows), now, rng)
        if force or self._full(len(offsets), now, limits):
            return self._take(min(len(offsets), limits.rows), now)
        return None

    def _full(self, n: int, now: float, limits: Limits) -> bool:
        return n >= limits.rows or self.nbytes >= limits.nbytes or now - self.since >= limits.age


class _WriterThread(threading.Thread):
    """Stores the batches of the partitions mapped to it, one at a time, in order."""

    def __init__(self, store: ExactlyOnce, abandon: threading.Event, outbox: queue.Queue, index: int):
        super().__init__(name=f"fdpass-sink-writer-{index}", daemon=True)
        self.store = Retrying(store, abandon, "not committed; it is re-formed from the recorded range by the next run")
        self.inbox: queue.Queue = queue.Queue()
        self.outbox = outbox
        self.fatal: BaseException | None = None

    @property
    def retrying(self) -> bool:
        return self.store.retrying

    def run(self) -> None:
        while True:
            b = self.inbox.get()
            if b is None:
                return
            if not b.cancelled and self.fatal is None:
                try:
                    started = time.monotonic()
                    if self.store.store(b):
                        b.write_seconds = time.monotonic() - started
                except BaseException as e:  # a bug, not a store failure: stop the sink, commit nothing more
                    log.exception("writer failed on %s", b.describe())
                    self.fatal = e
            if not b.stored:
                b.phase = Phase.ABANDONED
            self.outbox.put(b)


class Sink:
    def __init__(self, cfg: SinkConfig, store, stop: threading.Event | None = None,
                 abandon: threading.Event | None = None):
        self.cfg = cfg
        self.store = store
        self.stop = stop or threading.Event()
        self.abandon = abandon or threading.Event()
        self.limits = Limits(cfg.batch_rows, cfg.batch_bytes, cfg.batch_age)
        self.buffers: dict[int, PartitionBuffer] = {}
        self.pending: deque[Batch] = deque()
        self.paused = False
        self.stats = {"rows": 0, "dead": 0, "batches": 0, "replayed": 0, "skipped_done": 0, "commits": 0}
        self.assigned_history: list[set[int]] = []  # for tests and logs: every assignment received
        self.committed_offsets: dict[int, int] = {}  # partition -> next offset to store (committed or start)
        self._consumer = None
        self.last_batch = (0, 0.0)  # rows and seconds of the last stored batch (for metrics)
        self._lag: int | None = None

    # -- set-up -------------------------------------------------------------------
    def _kafka_conf(self) -> dict:
        return {
            "bootstrap.servers": self.cfg.bootstrap,
            "group.id": self.cfg.group,
            "client.id": f"fdpass-sink-{socket.gethostname()}-{os.getpid()}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            # A restarted sink waits for its dead predecessor's session to
            # expire before the group rebalances: keep that short.
            "session.timeout.ms": 10000,
            "heartbeat.interval.ms": 2000,
            "max.partition.fetch.bytes": 8 << 20,
            "queued.max.messages.kbytes": 64 << 10,  # librdkafka prefetch bound (its default)
            # A sink started before the collector created the topic (or added
            # partitions) sees it within 10 s, not librdkafka's default 5 min.
            "topic.metadata.refresh.interval.ms": 10000,
            **self.cfg.kafka_conf,
            # Eager rebalancing: the callbacks below assign/revoke whole sets
            # (cooperative assignment would need incremental_assign).
            "partition.assignment.strategy": "range,roundrobin",
        }

    def _ensure_dlq_topic(self, conf: dict, topic: str) -> None:
        admin = kafka.admin_client(conf)
        try:
            # one partition: dead letters are few; replication: the cluster's default
            kafka.ensure_topic(admin, admin.list_topics(timeout=15), topic, 1, -1, 15.0,
                               self.cfg.bootstrap)
        except kafka.TopicProblem as e:
            raise UserError(f"cannot create the dead-letter topic {topic}: {e}") from None

    # -- the loop -----------------------------------------------------------------
    def run(self) -> int:
        from confluent_kafka import Consumer, KafkaException

        from fdpass.schemas import clickhouse as ddl
        from fdpass.sinks.dlq import DeadLetters

        cfg = self.cfg
        conf = self._kafka_conf()
        dlq_topic = cfg.dlq_topic or cfg.topic + ".dlq"
        main_client = self._retrying(self.store.client, "connecting to ClickHouse")
        if main_client is None:
            return 1
        try:
            alters = self._retrying(lambda: ddl.ensure_schema(
                main_client, ddl.Options(database=self.store.database, ttl_days=cfg.ttl_days)),
                                    "creating the schema")
        except ddl.ClusterSchemaOutdated as e:
            raise UserError(str(e)) from None
        if alters is None:
            return 1
        for stmt in alters:
            log.info("migrated: %s", stmt)
        self.batch_log = BatchLog(main_client, self.store.database, cfg.topic)
        try:
            self._ensure_dlq_topic(conf, dlq_topic)
        except KafkaException as e:
            raise UserError(f"Kafka at {cfg.bootstrap} does not answer: {e}") from None
        self.dlq = DeadLetters(kafka.for_client(conf, "producer"), dlq_topic)
        self.outbox: queue.Queue = queue.Queue()
        self.writers = []
        for i in range(max(1, cfg.writers)):
            wc = self.store.client()  # one client per thread
            writer = Writer(wc, self.store.database, cfg.table, native=cfg.native)
            protocol = ExactlyOnce(BatchLog(wc, self.store.database, cfg.topic), self.dlq, writer.insert)
            self.writers.append(_WriterThread(protocol, self.abandon, self.outbox, i))
        for w in self.writers:
            w.start()
        consumer = self._consumer = Consumer(conf)
        consumer.subscribe([cfg.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)
        log.info("%s -> %s (group %s, dead letters to %s; batches of %d rows / %d MiB / %.1fs)",
                 cfg.topic, self.store.spec.describe(), cfg.group, dlq_topic, cfg.batch_rows, cfg.batch_bytes >> 20,
                 cfg.batch_age)
        rc = 0
        last_status = last_lag = time.monotonic()
        last_rows = 0
        try:
            while not self.stop.is_set():
                self._check_fatal()
                self._commit_finished()
                now = time.monotonic()
                if now - last_lag >= 1.0:
                    self._refresh_lag()
                    last_lag = now
                if now - last_status >= cfg.status_every:
                    rate = (self.stats["rows"] - last_rows) / (now - last_status)
                    last_status, last_rows = now, self.stats["rows"]
                    self._status(rate)
                if self._backpressure():
                    continue
                msgs = consumer.consume(num_messages=min(10000, cfg.batch_rows), timeout=0.1)
                now = time.monotonic()
                if msgs:
                    self._dispatch(msgs, now)
                for buf in list(self.buffers.values()):
                    while (b := buf.cut(now, self.limits)) is not None:
                        self._submit(b)
            rc = self._drain()
        except BaseException:
            self.abandon.set()  # failing: writers stop retrying; nothing more is committed
            raise
        finally:
            for w in self.writers:
                w.inbox.put(None)
            try:
                consumer.close()
            except Exception as e:  # noqa: BLE001 - closing after a broker loss must not mask the result
                log.warning("closing the consumer: %s", e)
            self.dlq.close()
        self._status(None)
        return rc

    def lag(self) -> int | None:
        """Messages in Kafka not yet stored over the assigned partitions, as of the last second.

        Computed in the consumer thread (_refresh_lag): confluent-kafka
        serialises calls on one consumer, and a scrape thread asking it
        directly would starve behind the consume loop.
        """
        return self._lag

    def _refresh_lag(self) -> None:
        from confluent_kafka import TopicPartition

        if self._consumer is None or not self.buffers:
            self._lag = None
            return
        total = 0
        try:
            committed = self.committed_offsets
            for p in self.buffers:
                # cached: the high watermark from the last fetch response, no broker call
                _, high = self._consumer.get_watermark_offsets(TopicPartition(self.cfg.topic, p), cached=True)
                if high >= 0 and p in committed:
                    total += max(0, high - committed[p])
        except Exception:  # noqa: BLE001 - a status figure must never stop the sink
            self._lag = None
            return
        self._lag = total

    def metrics(self) -> dict:
        """Flat counters and gauges for --metrics (fdpass.metrics reads them at scrape time)."""
        s = self.stats
        out = {
            "rows_stored": s["rows"], "dead_letters": s["dead"], "batches": s["batches"],
            "batches_reformed": s["replayed"], "batches_already_stored": s["skipped_done"], "commits": s["commits"],
            "batches_in_flight": len(self.pending),
            "retrying_batches_in_flight": sum(w.retrying for w in getattr(self, "writers", [])),
            "last_batch_size": self.last_batch[0], "insert_latency_seconds": self.last_batch[1],
            "partitions_assigned_size": len(self.buffers),
        }
        lag = self.lag()
        if lag is not None:
            out["consumer_lag"] = lag
        dlq = getattr(self, "dlq", None)
        for reason, n in (dlq.counts.items() if dlq else ()):
            out[f"dead_letters_{reason}"] = n
        return out

    def _status(self, rate) -> None:
        s = self.stats
        lag = self.lag()
        log.info("%d rows stored%s, %d dead letters %s, %d batches (%d re-formed, %d already stored), "
                 "partitions %s%s%s",
                 s["rows"], f" ({rate:,.0f}/s)" if rate is not None else "", s["dead"], dict(self.dlq.counts),
                 s["batches"], s["replayed"], s["skipped_done"], sorted(self.buffers),
                 f", lag {lag}" if lag is not None else "",
                 ", PAUSED (writer retrying)" if self.retrying else "")

    def _retrying(self, fn, what: str):
        """Run a store call, retrying while the store is unreachable; None if stopped first."""
        from clickhouse_connect.driver.exceptions import OperationalError

        from fdpass.sinks.store import StoreUnavailable

        # A server may come back; an embedded store that cannot open will not.
        transient = (OperationalError, StoreUnavailable) if self.store.spec.kind == "http" else (OperationalError,)
        for attempt, delay in enumerate(backoff_delays(), 1):
            try:
                return fn()
            except transient as e:
                log.warning("%s: ClickHouse unavailable (%s); retry %d in %.1fs", what, short(e), attempt, delay)
                if self.stop.wait(delay):
                    return None

    @property
    def retrying(self) -> bool:
        return any(w.retrying for w in self.writers)

    def _fatal(self) -> BaseException | None:
        return next((w.fatal for w in self.writers if w.fatal is not None), None)

    def _check_fatal(self) -> None:
        fatal = self._fatal()
        if fatal is not None:
            raise RuntimeError(f"a writer thread failed: {fatal!r}") from fatal

    def _dispatch(self, msgs: list, now: float) -> None:
        from confluent_kafka import KafkaError

        if any(map(_ERROR, msgs)):  # rare: events (partition EOF, broker errors) among the messages
            good = []
            for m in msgs:
                err = m.error()
                if err is None:
                    good.append(m)
                elif err.code() == KafkaError._PARTITION_EOF:
                    continue
                elif err.fatal():
                    raise UserError(f"Kafka: {err.str()}")
                else:
                    log.warning("Kafka: %s", err.str())
            msgs = good
        # librdkafka hands out each partition's fetched messages as one run
        for p, run in groupby(msgs, key=_PARTITION):
            buf = self.buffers.get(p)
            if buf is not None:  # messages of a partition revoked meanwhile are not ours to store
                buf.add_many(list(run), now)

    def _submit(self, b: Batch) -> None:
        self.pending.append(b)
        self.writers[b.partition % len(self.writers)].inbox.put(b)

    def _backpressure(self) -> bool:
        """True when the loop must not read more now.

        Normally the writers are just busy: wait for one to finish without
        polling -- librdkafka keeps prefetching into its bounded queue and
        heartbeats from its own thread. Pausing instead would drop that
        prefetched data and re-fetch it on resume (measured: ~40 % slower).
        While a writer is retrying a failing store, the partitions are
        paused and the loop polls, so the group membership (and rebalance
        callbacks) stay alive for as long as the outage lasts.
        """
        retrying = self.retrying
        if retrying and not self.paused:
            parts = self._consumer.assignment()
            if parts:
                self._consumer.pause(parts)
            self.paused = True
        elif not retrying and self.paused:
            parts = self._consumer.assignment()
            if parts:
                self._consumer.resume(parts)
            self.paused = False
        if len(self.pending) >= self.cfg.max_inflight and not retrying:
            self._commit_finished(wait=0.2)
            return True
        return False

    def _commit_finished(self, wait: float = 0.0) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        while True:
            try:
                b = self.outbox.get(timeout=wait) if wait else self.outbox.get_nowait()
            except queue.Empty:
                return
            wait = 0.0
            self.pending.remove(b)
            if not b.stored:
                continue
            if b.partition not in self.buffers:  # no longer ours: the new owner re-forms it if need be
                continue
            self.stats["batches"] += 1
            self.stats["rows"] += b.rows
            self.stats["dead"] += b.dead
            self.stats["replayed"] += b.reformed
            self.stats["skipped_done"] += b.phase is Phase.ALREADY_DONE
            self.last_batch = (len(b.values), getattr(b, "write_seconds", 0.0))
            try:
                self._consumer.commit(offsets=[TopicPartition(b.topic, b.partition, b.last + 1)], asynchronous=False)
                self.stats["commits"] += 1
                self.committed_offsets[b.partition] = b.last + 1
                b.phase = Phase.COMMITTED
            except KafkaException as e:
                # Not fatal: the batch is stored and recorded done; a replay skips it.
                log.warning("commit of %s failed: %s", b.describe(), e)

    # -- rebalances (called from inside consumer.consume) -----------------------------
    def _on_assign(self, consumer, tps) -> None:
        from confluent_kafka import TopicPartition

        self.assigned_history.append({tp.partition for tp in tps})
        committed = consumer.committed([TopicPartition(tp.topic, tp.partition) for tp in tps], timeout=30)
        starts = {}
        for tp, c in zip(tps, committed):
            start = c.offset
            if start < 0:  # no commit yet: the beginning of what Kafka still has
                start, _ = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=30)
            starts[tp.partition] = start
        plans = self._retrying(lambda: self.batch_log.pending_many(starts), "reading recorded batches")
        for tp in tps:
            if plans is None:  # stopping before the plans were read: store nothing of these partitions
                break
            start, plan = starts[tp.partition], plans[tp.partition]
            if plan and plan[0].first < start:
                start = plan[0].first
            self.buffers[tp.partition] = PartitionBuffer(tp.topic, tp.partition, plan)
            self.committed_offsets[tp.partition] = start
            tp.offset = start
            log.info("assigned %s[%d] from offset %d%s", tp.topic, tp.partition, start,
                     f"; re-forming {len(plan)} recorded batches {[(r.first, r.last) for r in plan[:3]]}" if plan else "")
        consumer.assign(tps)
        self.paused = False

    def _on_revoke(self, consumer, tps) -> None:
        revoked = {tp.partition for tp in tps}
        for b in self.pending:
            if b.partition in revoked:
                b.cancelled = True  # not started: skipped; retrying: abandoned; writing: finishes
        while any(b.partition in revoked for b in self.pending) and self._fatal() is None:
            self._commit_finished(wait=0.2)  # commits what was written while we still own it
        for p in revoked:
            self.buffers.pop(p, None)
        log.info("revoked %s partitions %s", self.cfg.topic, sorted(revoked))
        try:
            consumer.unassign()
        except Exception:  # noqa: BLE001 - unassign after a lost session may fail; nothing to undo
            pass
        self.paused = False

    def _on_lost(self, consumer, tps) -> None:
        # Lost (session expired): committing is no longer possible; drop, and
        # the new owner re-forms the recorded ranges.
        lost = {tp.partition for tp in tps}
        for p in lost:
            self.buffers.pop(p, None)
        for b in self.pending:
            if b.partition in lost:
                b.cancelled = True
        log.warning("lost partitions %s (session expired); their batches are left to the new owner",
                    sorted(tp.partition for tp in tps))

    # -- shutdown -----------------------------------------------------------------------
    def _drain(self) -> int:
        log.info("stopping: flushing open batches")
        now = time.monotonic()
        for buf in list(self.buffers.values()):
            while (b := buf.cut(now, self.limits, force=True)) is not None:
                self._submit(b)
        while self.pending:
            if self._fatal() is not None:
                break
            self._commit_finished(wait=0.5)
        self._check_fatal()
        if self.abandon.is_set():
            log.warning("stopped without storing every batch; nothing unstored was committed")
            return 1
        return 0
