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
is retried with backoff, never dropped; past a memory bound (stated in
--help) the newest events are dropped, counted and logged.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections import deque

from fdpass import logs
from fdpass.errors import UserError

log = logging.getLogger("fdpass.run")

DEFAULT_STORE = "/var/lib/fdpass/store"
BATCH_ROWS = 20000
BATCH_AGE_S = 1.0
MAX_QUEUED = 2_000_000  # ~200 bytes each: ~400 MB before anything is dropped

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
  fdpass run --backend tracepoint     capture from tracepoints even where fentry works
                                      (see `fdpass collect --help` for the two backends)
"""


def register(sub) -> None:
    from fdpass.collector.cli import add_backend_argument, add_filter_arguments, seconds_arg

    p = sub.add_parser("run", help="record on this host into embedded ClickHouse (no servers)",
                       description=RUN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default=DEFAULT_STORE, metavar="DIR",
                   help=f"embedded ClickHouse directory (default {DEFAULT_STORE})")
    p.add_argument("--duration", type=seconds_arg, metavar="SECONDS", help="stop after this long")
    p.add_argument("--batch-rows", type=int, default=BATCH_ROWS, help=f"insert at this many events (default {BATCH_ROWS})")
    p.add_argument("--batch-age", type=float, default=BATCH_AGE_S,
                   help=f"... or after this many seconds (default {BATCH_AGE_S})")
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


class StoreWriter(threading.Thread):
    """Inserts queued encoded events in batches; retries a failing store forever."""

    def __init__(self, client, table: str, version: int, batch_rows: int, batch_age: float):
        super().__init__(name="fdpass-store-writer", daemon=True)
        self.client, self.table, self.version = client, table, version
        self.batch_rows, self.batch_age = batch_rows, batch_age
        self.queue: deque[tuple[str, bytes]] = deque()
        self.cond = threading.Condition()
        self.closing = False
        self.stored = 0
        self.dropped = 0
        self.failures = 0
        self.last_insert_seconds = 0.0
        self.error: str | None = None

    def put(self, event_id: str, value: bytes) -> None:
        with self.cond:
            if len(self.queue) >= MAX_QUEUED:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 10000 == 0:
                    log.error("store is not keeping up: %d events dropped so far (queue bound %d)",
                              self.dropped, MAX_QUEUED)
                return
            self.queue.append((event_id, value))
            if len(self.queue) >= self.batch_rows:
                self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.join()

    def run(self) -> None:
        from fdpass.sinks.writer import backoff_delays, insert_messages

        while True:
            with self.cond:
                if not self.queue and not self.closing:
                    self.cond.wait(self.batch_age)
                if not self.queue:
                    if self.closing:
                        return
                    continue
                if len(self.queue) < self.batch_rows and not self.closing:
                    self.cond.wait(self.batch_age)
                n = min(len(self.queue), self.batch_rows)
                batch = [self.queue[i] for i in range(n)]
            values = [v for _, v in batch]
            token = f"run/{batch[0][0]}/{n}"
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
                    delay = next(delays)
                    log.error("insert of %d events failed (%s); retrying in %.1f s, nothing is dropped",
                              n, self.error, delay)
                    time.sleep(delay)
            self.error = None
            if rejected:  # the codec of this process wrote them: a bug, said loudly
                _, reason, detail = rejected[0]
                log.error("%d events do not transcode and are not stored (first: %s, %s)", len(rejected), reason, detail)
            with self.cond:
                for _ in range(n):
                    self.queue.popleft()
                self.stored += n - len(rejected)
                self.dropped += len(rejected)


def run(args) -> int:
    logs.setup("run", args.verbose, args.log_format)
    if args.batch_rows <= 0 or args.batch_age <= 0:
        raise UserError("--batch-rows and --batch-age must be greater than 0")
    from fdpass.collector.cli import filters_from_args

    filters = filters_from_args(args)
    from fdpass.collector.collect import Collector
    from fdpass.schemas import avro, codec
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
        encode = codec.encode

        def output(event: dict) -> None:
            writer.put(event["event_id"], encode(event))

        collector = Collector(output, filters, backend=args.backend)
        attached = lambda: print(f"fdpass run: probes attached ({collector.probes.backend} backend: "  # noqa: E731
                                 f"{collector.probes.why}); recording into {store_dir}", file=sys.stderr, flush=True)
        if args.metrics:
            from fdpass import metrics

            metrics.serve(args.metrics, {"run": lambda: {
                **collector.stats(), "stored": writer.stored, "store_backlog": len(writer.queue),
                "dropped_store_backlog": writer.dropped, "store_failures": writer.failures,
                "store_insert_seconds": writer.last_insert_seconds}})
        collector.stop_on_signals()
        attached()  # after the metrics endpoint is up
        status = StatusLine(collector, writer, store_dir, enabled=sys.stderr.isatty() and not args.no_status)
        try:
            stats = collector.run(duration=args.duration, tick=status.tick)
        finally:
            status.clear()
            writer.close()
        stats.update(stored=writer.stored, dropped_store_backlog=writer.dropped)
        print("fdpass run: stopped; " + ", ".join(f"{k}={v}" for k, v in stats.items()), file=sys.stderr)
        print(f"fdpass run: query it with: fdpass query --clickhouse chdb://{store_dir} "
              f"\"SELECT count() FROM {DATABASE}.{TABLE}\"", file=sys.stderr)
        return 1 if writer.dropped else 0
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
