"""`fdpass run`: the whole chain on one host with no servers.

probes -> contract events -> Avro single-object encoding (the codec the
collector publishes with) -> INSERT into embedded ClickHouse (chDB) through
the Kafka sink's own writer (sinks.writer.Writer: a Native block from the C
transcoder, or an Avro container without it; rows the store refuses are
isolated). So the data is byte-for-byte what a fleet deployment would
store, and pointing `--store` at a ClickHouse server DSN later changes
nothing about it.

The collector thread only encodes and queues; a writer thread inserts, so a
slow insert never stalls the ring buffer drain. Batches go through the
sink's protocol objects (sinks/exactly_once.py): InsertOnly (there is no
Kafka log to replay from) and Retrying. Their insert tokens follow the
sink's scheme under a topic name unique to this run, so a retry after an
insert whose answer was lost stores nothing twice. A failing store is
retried with backoff, never dropped; while MAX_QUEUED (50k) events wait for
it, the collector stops reading and the kernel ring buffer (--ringbuf-pages)
holds the rest; past that the kernel drops the newest, counted and logged.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections import deque
from itertools import islice

from fdpass import defaults, logs
from fdpass.errors import UserError

log = logging.getLogger("fdpass.run")

DEFAULT_STORE = defaults.STORE_DIR
BATCH_ROWS = 20000
BATCH_AGE_S = 1.0
# Encoded events waiting for the store (~400 bytes each: ~20 MB of the RSS target, docs/architecture.md
# "Memory"): two 20k-row batches and slack; past it the kernel ring buffer, 3x more compact, holds the rest.
MAX_QUEUED = 50_000

RUN_HELP = """\
Record every file descriptor passed on this host into an embedded ClickHouse
store (chDB): no Kafka, no server. Needs root. Stop with Ctrl-C (or
--duration); everything recorded is stored before it exits.

On a terminal a status line shows events/s, totals, kernel-side losses and
the store's size. Query the store afterwards (not while `run` holds it):

  fdpass query --clickhouse chdb:///var/lib/fdpass/store "SELECT count() FROM fdpass.events"

Memory: ~250 MB of its own (not counting the ring buffer) at 150k events/s; chDB's
allocator is given one arena and a 100 ms page decay through JE_MALLOC_CONF,
unless you set that variable yourself.

examples:
  fdpass run                          record until Ctrl-C into /var/lib/fdpass/store
  fdpass run --duration 60 --store /tmp/fdpass-store
  fdpass run --pid 1234               only what process 1234 passes or receives
  fdpass run --backend tracepoint     capture from tracepoints even where fentry works
                                      (see `fdpass collect --help` for the two backends)
"""


def register(sub) -> None:
    from fdpass.collector.cli import add_backend_argument, add_filter_arguments, add_ringbuf_argument, seconds_arg

    p = sub.add_parser("run", help="record on this host into embedded ClickHouse (no servers)",
                       description=RUN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default=DEFAULT_STORE, metavar="DIR",
                   help=f"embedded ClickHouse directory (default {DEFAULT_STORE})")
    p.add_argument("--duration", type=seconds_arg, metavar="SECONDS", help="stop after this long")
    p.add_argument("--batch-rows", type=int, default=BATCH_ROWS, help=f"insert at this many events (default {BATCH_ROWS})")
    p.add_argument("--batch-age", type=float, default=BATCH_AGE_S,
                   help=f"... or after this many seconds (default {BATCH_AGE_S})")
    add_ringbuf_argument(p)
    p.add_argument("--no-status", action="store_true", help="no status line even on a terminal")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics here (e.g. 0.0.0.0:9464)")
    logs.add_arguments(p)
    add_filter_arguments(p)
    add_backend_argument(p)
    p.set_defaults(func=run)


def _dir_size(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run_topic() -> str:
    """The name this run's batches carry in their insert tokens: unique per run, so that a later run's
    batch 0 is not taken for a repeat of an earlier one's."""
    from fdpass.collector.enrich import HostInfo

    host = HostInfo()
    return f"run/{host.host}/{host.boot_id}/{time.time_ns()}"


class StoreWriter(threading.Thread):
    """Cuts queued encoded events into batches and stores each through the sink's writer.

    `store` is a protocol object with store(batch) (sinks/exactly_once.py:
    InsertOnly over sinks.writer.Writer.insert, the sink's insert and bad-row
    isolation); the batches are numbered like one Kafka partition's offsets
    under `topic`, which gives them the sink's token scheme."""

    def __init__(self, store, topic: str, batch_rows: int, batch_age: float):
        super().__init__(name="fdpass-store-writer", daemon=True)
        from fdpass.sinks.exactly_once import Retrying

        # Never given up: `run` has nowhere else to keep what it captured.
        self.retry = Retrying(store, threading.Event(), "never")
        self.topic = topic
        self.batch_rows, self.batch_age = batch_rows, batch_age
        self.queue: deque[bytes] = deque()
        self.cond = threading.Condition()
        self.closing = False
        self.next_offset = 0
        self.stored = 0
        self.rejected = 0
        self.last_insert_seconds = 0.0

    @property
    def error(self) -> str | None:
        return self.retry.error

    @property
    def failures(self) -> int:
        return self.retry.failures

    def put_many(self, values: list[bytes]) -> None:
        """Queue a batch of encoded events (the collector stops reading while holding() says so)."""
        with self.cond:
            first = not self.queue
            self.queue.extend(values)
            if first or len(self.queue) >= self.batch_rows:
                self.cond.notify()

    def holding(self) -> bool:
        """True while MAX_QUEUED events wait: the collector then leaves records
        in the kernel ring buffer (3x more compact than encoded messages, and
        sized by --ringbuf-pages), and what does not fit there is counted as
        ring buffer drops."""
        return len(self.queue) >= MAX_QUEUED

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.join()

    def _next_batch(self):
        """The next batch once it is due (batch_rows, or batch_age after the writer saw its first
        event: the bound on how long a row waits); None when closing with nothing left."""
        from fdpass.sinks.exactly_once import Batch

        with self.cond:
            while not self.queue and not self.closing:
                self.cond.wait()
            if not self.queue:
                return None
            deadline = time.monotonic() + self.batch_age
            while len(self.queue) < self.batch_rows and not self.closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            n = min(len(self.queue), self.batch_rows)
            values = list(islice(self.queue, n))
        first = self.next_offset
        return Batch(topic=self.topic, partition=0, first=first, last=first + n - 1, values=values,
                     keys=[None] * n, offsets=range(first, first + n))

    def run(self) -> None:
        while True:
            b = self._next_batch()
            if b is None:
                return  # closing, and everything is stored
            started = time.monotonic()
            self.retry.store(b)  # returns once stored: never given up
            self.last_insert_seconds = time.monotonic() - started
            with self.cond:
                for _ in range(len(b.values)):
                    self.queue.popleft()
                self.next_offset = b.last + 1
                self.stored += b.rows
                self.rejected += b.dead


def _log_rejected(batch, dead: list) -> None:
    """Messages this process encoded that the store cannot take: a bug, said loudly (no dead-letter topic here)."""
    _, reason, detail = dead[0]
    log.error("%d events do not transcode and are not stored (first: %s, %s)", len(dead), reason, detail)


def run(args) -> int:
    logs.setup("run", args.verbose, args.log_format)
    if args.batch_rows <= 0 or args.batch_age <= 0:
        raise UserError("--batch-rows and --batch-age must be greater than 0")
    from fdpass.collector.cli import check_ringbuf_pages, filters_from_args

    check_ringbuf_pages(args.ringbuf_pages)
    filters = filters_from_args(args)
    from fdpass.collector.collect import Collector, cpu_summary
    from fdpass.schemas.clickhouse import DATABASE, TABLE, ensure_schema
    from fdpass.sinks.exactly_once import InsertOnly
    from fdpass.sinks.store import allocator_options, lean_embedded_allocator, open_store
    from fdpass.sinks.writer import Writer

    store_dir = os.path.abspath(args.store)
    try:
        os.makedirs(store_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--store {args.store}: cannot create it ({e.strerror})") from None
    lean_embedded_allocator()  # before chDB loads: what its merges free goes back to the OS (sinks/store.py)
    store = open_store(f"chdb://{store_dir}")
    try:
        client = store.client()
        if args.verbose:
            log.debug("chDB allocator: %s", allocator_options(client))
        ensure_schema(client)
        protocol = InsertOnly(Writer(client, DATABASE, TABLE).insert, _log_rejected)
        writer = StoreWriter(protocol, run_topic(), args.batch_rows, args.batch_age)
        writer.start()
        collector = Collector(filters=filters, ringbuf_pages=args.ringbuf_pages, encoded_output=writer.put_many,
                              hold=writer.holding, backend=args.backend)
        attached = lambda: print(f"fdpass run: probes attached ({collector.probes.backend} backend: "  # noqa: E731
                                 f"{collector.probes.why}); recording into {store_dir}", file=sys.stderr, flush=True)
        if args.metrics:
            from fdpass import metrics

            metrics.serve(args.metrics, {"run": lambda: {
                **collector.stats(), "stored": writer.stored, "store_backlog": len(writer.queue),
                "rejected_by_store": writer.rejected, "store_failures": writer.failures,
                "store_insert_seconds": writer.last_insert_seconds}})
        collector.stop_on_signals()
        attached()  # after the metrics endpoint is up
        status = StatusLine(collector, writer, store_dir, enabled=sys.stderr.isatty() and not args.no_status)
        try:
            stats = collector.run(duration=args.duration, tick=status.tick)
        finally:
            status.clear()
            writer.close()
        stats.update(stored=writer.stored, rejected_by_store=writer.rejected)
        stats.update(cpu_summary(collector.cpu_start, stats))  # again: the last inserts count too
        print("fdpass run: stopped; " + ", ".join(f"{k}={v}" for k, v in stats.items()), file=sys.stderr)
        print(f"fdpass run: query it with: fdpass query --clickhouse chdb://{store_dir} "
              f"\"SELECT count() FROM {DATABASE}.{TABLE}\"", file=sys.stderr)
        return 1 if writer.rejected else 0
    finally:
        store.close()


class StatusLine:
    """One line, rewritten in place about once a second, on a terminal only."""

    def __init__(self, collector, writer: StoreWriter, store_dir: str, enabled: bool):
        self.collector, self.writer, self.store_dir, self.enabled = collector, writer, store_dir, enabled
        self._next = 0.0
        self._last = (time.monotonic(), 0)
        self._size = 0
        self._size_next = 0.0

    def tick(self) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + 1.0
        s = self.collector.stats()
        total = s["events_send"] + s["events_recv"]
        rate = (total - self._last[1]) / max(now - self._last[0], 1e-6)
        self._last = (now, total)
        if now >= self._size_next:  # walking the store costs: every 5 s
            self._size = _dir_size(self.store_dir)
            self._size_next = now + 5.0
        lost = (s["kernel_ringbuf_drops"] + s["loss_records"] + s["kernel_pending_full"] + s["kernel_uring_unseen"]
                + s["kernel_recv_unresolved"])
        line = (f"{rate:8.0f} ev/s | send {s['events_send']} recv {s['events_recv']} | stored {self.writer.stored}"
                f" | kernel losses {lost} | store {_human(self._size)}")
        if self.writer.error:
            line += " | STORE FAILING, retrying"
        sys.stderr.write("\r\x1b[K" + line)
        sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
