"""`fdpass run`: the whole chain on one host with no servers.

probes -> contract events -> Avro single-object encoding (the codec the
collector publishes with) -> INSERT into embedded ClickHouse (chDB) through
the Kafka sink's own insert path (sinks.writer.insert_messages: a Native
block from the C transcoder, or an Avro container without it). So the data
is byte-for-byte what a fleet deployment would store, and pointing
`--store` at a ClickHouse server DSN later changes nothing about it.

The collector thread only encodes and queues; a writer thread inserts, so a
slow insert never stalls the ring buffer drain. Each insert carries a
deduplication token derived from its first event id and size, so a retry
after an insert whose answer was lost stores nothing twice. A failing store
is retried with backoff, never dropped; while MAX_QUEUED events wait for
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
MAX_QUEUED = 100_000  # encoded events waiting for the store (~400 bytes each: ~40 MB)

RUN_HELP = """\
Record every file descriptor passed on this host into an embedded ClickHouse
store (chDB): no Kafka, no server. Needs root. Stop with Ctrl-C (or
--duration); everything recorded is stored before it exits.

On a terminal a status line shows events/s, totals, kernel-side losses and
the store's size. Query the store afterwards (not while `run` holds it):

  fdpass query --clickhouse chdb:///var/lib/fdpass/store "SELECT count() FROM fdpass.events"

examples:
  fdpass run                          record until Ctrl-C into /var/lib/fdpass/store
  fdpass run --duration 60 --store /tmp/fdpass-store
  fdpass run --pid 1234               only what process 1234 passes or receives
"""


def register(sub) -> None:
    from fdpass.collector.cli import add_filter_arguments, add_ringbuf_argument, seconds_arg

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


class StoreWriter(threading.Thread):
    """Inserts queued encoded events in batches; retries a failing store forever."""

    def __init__(self, client, table: str, version: int, batch_rows: int, batch_age: float):
        super().__init__(name="fdpass-store-writer", daemon=True)
        self.client, self.table, self.version = client, table, version
        self.batch_rows, self.batch_age = batch_rows, batch_age
        self.queue: deque[bytes] = deque()
        self.cond = threading.Condition()
        self.closing = False
        self.stored = 0
        self.rejected = 0
        self.failures = 0
        self.last_insert_seconds = 0.0
        self.error: str | None = None

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

    def run(self) -> None:
        from fdpass.schemas import codec
        from fdpass.sinks.outage import StoreOutage
        from fdpass.sinks.writer import backoff_delays, insert_messages

        outage = StoreOutage(log, "the events wait in memory, then in the kernel's ring buffer; nothing is dropped "
                                  "until that is full")

        while True:
            with self.cond:
                while not self.queue and not self.closing:
                    self.cond.wait()
                if not self.queue:
                    return  # closing, and everything is stored
                # A batch goes at batch_rows, or batch_age after the writer
                # saw its first event: the bound on how long a row waits.
                deadline = time.monotonic() + self.batch_age
                while len(self.queue) < self.batch_rows and not self.closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.cond.wait(left)
                n = min(len(self.queue), self.batch_rows)
                values = list(islice(self.queue, n))
            token = f"run/{codec.decode(values[0])['event_id']}/{n}"
            delays = backoff_delays()
            while True:
                started = time.monotonic()
                try:
                    rejected = insert_messages(self.client, self.table, self.version, values, token, {})
                    self.last_insert_seconds = time.monotonic() - started
                    break
                except Exception as e:  # any store failure: keep the batch, wait, retry
                    self.failures += 1
                    self.error = " ".join(str(e).split())[:200]
                    time.sleep(outage.failed(f"insert of {n} events: {self.error}", next(delays)))
            outage.recovered()
            self.error = None
            if rejected:  # the codec of this process wrote them: a bug, said loudly
                _, reason, detail = rejected[0]
                log.error("%d events do not transcode and are not stored (first: %s, %s)", len(rejected), reason, detail)
            with self.cond:
                for _ in range(n):
                    self.queue.popleft()
                self.stored += n - len(rejected)
                self.rejected += len(rejected)


def run(args) -> int:
    logs.setup("run", args.verbose, args.log_format)
    if args.batch_rows <= 0 or args.batch_age <= 0:
        raise UserError("--batch-rows and --batch-age must be greater than 0")
    from fdpass.collector.cli import check_ringbuf_pages, filters_from_args

    check_ringbuf_pages(args.ringbuf_pages)
    filters = filters_from_args(args)
    from fdpass.collector.collect import Collector
    from fdpass.schemas import avro
    from fdpass.schemas.clickhouse import DATABASE, TABLE, ensure_schema
    from fdpass.sinks.store import open_store

    store_dir = os.path.abspath(args.store)
    try:
        os.makedirs(store_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--store {args.store}: cannot create it ({e.strerror})") from None
    store = open_store(f"chdb://{store_dir}")
    try:
        client = store.client()
        ensure_schema(client)
        writer = StoreWriter(client, f"{DATABASE}.{TABLE}", avro.CURRENT_VERSION, args.batch_rows, args.batch_age)
        writer.start()
        attached = lambda: print("fdpass run: probes attached; recording into " + store_dir,  # noqa: E731
                                 file=sys.stderr, flush=True)
        collector = Collector(filters=filters, ringbuf_pages=args.ringbuf_pages, encoded_output=writer.put_many,
                              hold=writer.holding)
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
        lost = s["kernel_ringbuf_drops"] + s["loss_records"] + s["kernel_pending_full"]
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
