"""Sink throughput: Kafka -> chDB end to end, against inserting the same rows straight into chDB.

    .venv/bin/python bench/bench_sink.py [--events 400000] [--partitions 4] [--batch-rows 50000,100000]
                                         [--writers 2] [--repeat 3] [--kafka HOST:PORT]

Without --kafka a broker is started with scripts/kafka-local on a free port
(fresh data dir, stopped at the end). In one run, in one process, on one
chDB store, it measures:

  transcode          the C transcoder alone (Avro messages -> one Native block)
  ceiling, columns   clickhouse-connect inserting the decoded events as column
                     lists (client.insert, column_oriented) -- the usual way to
                     feed ClickHouse from Python; the brief's ceiling
  ceiling, Native    clickhouse-connect inserting the same messages the way the
                     sink does (transcoder + raw Native insert), no Kafka
  ceiling, Avro      the same as Avro containers (the fallback path), no Kafka
  sink e2e           the real sink (consumer thread, writer threads, state
                     rows, commits) from the first assignment until every row
                     is stored, per --batch-rows value, --repeat times

Ceilings insert blocks of the largest --batch-rows. Each line gives rows/s
and CPU us/row (the process's CPU time over the interval, every thread:
ClickHouse's and librdkafka's too, divided by the rows): the machine is
shared and wall-clock rates swing by tens of percent, CPU per row much less.
The sink's best and median rate are compared with the columns ceiling.
Background merges run as they would in `fdpass sink` (not stopped).

Recorded on the project's 2-CPU VM (chDB 26.9, confluent-kafka 2.16,
366-byte events, 4 partitions, 2 writers; three runs of --repeat 3-4 between
12:55 and 13:36 on 2026-12-01, host probe 0.38-0.7 s):
  transcode                 0.46-0.77 CPU us/row (cold input, as in the sink)
  ceiling, columns          98-111k rows/s, 9-10 CPU us/row
  ceiling, Native           388-480k rows/s, 2.1-2.5 CPU us/row
  ceiling, Avro             90-115k rows/s, 8.7-11 CPU us/row
  sink e2e, 100k batches    median 221-273k rows/s, best 248-319k,
                            5.0-7.5 CPU us/row: ~2.2-2.5x the columns ceiling
  sink e2e, 50k batches     median 212-247k, best 223-290k
  (the Avro path before the transcoder: 65-110k rows/s)
Where the sink's CPU goes (per-thread CPU times, 100k-row batches):
confluent-kafka's consume() ~1.3 us/row (one Message object per event,
built while holding the GIL) and the consumer thread's own handling ~0.6,
librdkafka's fetch thread ~0.8, the two writers ~1.3 (transcode, chDB's
Native parse), ClickHouse's part writing ~1.4, the broker ~0.15. ~10% of an
e2e run is start-up: ~20 ms assignment, ~140 ms until the first fetched
messages (librdkafka parses a partition's whole fetched chunk first). Over
longer streams (2M events, 6 partitions: ~200k rows/s) background merges
add ~3 CPU us/row.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn()."""
    t, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - cpu


def host_speed() -> float:
    """Seconds of a fixed pure-Python loop: how fast this (shared) machine runs right now."""
    t = time.perf_counter()
    x = 0
    for i in range(10_000_000):
        x += i
    return time.perf_counter() - t


def line(name: str, n: int, wall: float, cpu: float, extra: str = "") -> float:
    rate = n / wall
    print(f"{name:44} {rate:>10,.0f} rows/s {cpu / n * 1e6:6.2f} CPU us/row{extra}", flush=True)
    return rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=400_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--batch-rows", default="50000,100000")
    ap.add_argument("--writers", default="2", help="writer threads to try, comma-separated (default 2)")
    ap.add_argument("--repeat", type=int, default=3, help="sink runs per setting (default 3)")
    ap.add_argument("--kafka", help="use this broker instead of starting one")
    args = ap.parse_args()

    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    from fdpass.collector.publisher import PERFORMANCE_DEFAULTS
    from fdpass.schemas import clickhouse as ddl
    from fdpass.schemas import codec, synthetic
    from fdpass.schemas.avro import CURRENT_VERSION
    from fdpass.schemas.fields import FIELD_NAMES
    from fdpass.sinks import conversion
    from fdpass.sinks.consumer import Sink, SinkConfig, tune_gc
    from fdpass.sinks.store import open_store
    from fdpass.sinks.writer import insert_payload

    if conversion.NATIVE_MISSING is not None:
        print(f"the C transcoder is not built ({conversion.NATIVE_MISSING}): run scripts/setup", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="fdpass-bench-sink-"))
    broker_cmd = None
    if args.kafka:
        bootstrap = args.kafka
    else:
        port = free_port()
        broker_cmd = [str(ROOT / "scripts" / "kafka-local"), "--port", str(port), "--data", str(tmp / "kafka")]
        out = subprocess.run([*broker_cmd, "start"], capture_output=True, text=True, check=True)
        bootstrap = out.stdout.strip()
    try:
        n = args.events
        print(f"encoding {n} events ...", flush=True)
        events = [synthetic.make_event(i, host=f"node-{i % 8}") for i in range(n)]
        values = [codec.encode(e) for e in events]
        keys = [e["host_id"].encode() + str(i % 64).encode() for i, e in enumerate(events)]
        print(f"  {sum(map(len, values)) / n:.0f} bytes per message", flush=True)
        topic = f"bench-sink-{os.getpid()}"
        admin = AdminClient({"bootstrap.servers": bootstrap})
        admin.create_topics([NewTopic(topic, args.partitions, 1)])[topic].result(30)
        # The collector's producer settings (collector/publisher.py), so the sink reads batches as it would.
        p = Producer({"bootstrap.servers": bootstrap, **PERFORMANCE_DEFAULTS, "queue.buffering.max.messages": 1_000_000})
        t = time.perf_counter()
        for v, k in zip(values, keys):
            while True:
                try:
                    p.produce(topic, v, key=k)
                    break
                except BufferError:
                    p.poll(0.05)
        assert p.flush(120) == 0
        del p  # its threads would keep calling a stopped broker
        print(f"produced to {topic} ({args.partitions} partitions) in {time.perf_counter() - t:.1f}s", flush=True)

        tune_gc()  # as `fdpass sink` does
        store = open_store(f"chdb://{tmp / 'store'}")
        client = store.client()
        ddl.ensure_schema(client)
        batch_sizes = [int(x) for x in args.batch_rows.split(",")]
        block = max(batch_sizes)
        chunks = [values[i:i + block] for i in range(0, n, block)]

        # -- the transcoder alone, then the ceilings ---------------------------------
        def transcode_all():
            for c in chunks:
                conversion.payload(CURRENT_VERSION, c)  # each block freed at once, as the sink does

        best = min(timed(transcode_all)[1] for _ in range(3))
        print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; a 10M-step Python loop takes "
              f"{host_speed():.2f}s (~0.4s on a quiet host); blocks of {block} rows")
        print(f"{'transcode (Avro messages -> Native block)':44} {best / n * 1e6:28.2f} CPU us/row", flush=True)
        decoded = [codec.decode(v) for v in values]
        cols = conversion.events_to_columns(decoded)
        names = list(FIELD_NAMES)

        def insert_columns():
            for i in range(0, n, block):
                client.insert("fdpass.events", [c[i:i + block] for c in cols], column_names=names,
                              column_oriented=True)

        def insert_payloads(native: bool):
            for k, c in enumerate(chunks):
                insert_payload(client, "fdpass.events", conversion.payload(CURRENT_VERSION, c, native),
                               f"bench/{native}/{k}", {})

        ceiling = line("ceiling, columns (insert of column lists)", n, *timed(insert_columns))
        for native, name in ((True, "ceiling, Native (transcoder + raw insert)"),
                             (False, "ceiling, Avro   (Avro containers, fallback)")):
            client.command("TRUNCATE TABLE fdpass.events")
            line(name, n, *timed(lambda: insert_payloads(native)))

        # -- the sink ---------------------------------------------------------------
        results: dict[str, list[float]] = {}
        runs = [(rows, w) for w in (int(x) for x in args.writers.split(",")) for rows in batch_sizes]
        for rows, writers in runs:
            label = f"sink e2e, --batch-rows {rows:>6}, {writers} writers"
            for r in range(args.repeat):
                client.command("TRUNCATE TABLE fdpass.events")
                client.command("TRUNCATE TABLE fdpass.sink_batches")
                cfg = SinkConfig(bootstrap=bootstrap, topic=topic, group=f"bench-{rows}-{writers}-{r}-{os.getpid()}",
                                 batch_rows=rows, writers=writers, status_every=3600)
                sink = Sink(cfg, store)
                th = threading.Thread(target=sink.run, daemon=True)
                th.start()
                while not sink.assigned_history:
                    time.sleep(0.01)
                load = os.getloadavg()[0]
                t, cpu = time.perf_counter(), time.process_time()
                while sink.stats["rows"] < n:
                    time.sleep(0.005)
                    if not th.is_alive():
                        raise SystemExit("sink stopped early")
                wall, cpu = time.perf_counter() - t, time.process_time() - cpu
                sink.stop.set()
                th.join(60)
                got = client.query("SELECT count(), uniqExact(event_id) FROM fdpass.events").result_rows[0]
                assert got == (n, n), got
                rate = line(label, n, wall, cpu, f"  = {n / wall / ceiling:.2f}x columns ceiling "
                                                 f"({sink.stats['batches']} batches, load {load:.2f})")
                results.setdefault(label, []).append(rate)
        best_label = max(results, key=lambda k: max(results[k]))
        top, med = max(results[best_label]), statistics.median(results[best_label])
        met = med >= 300_000 and med >= 0.7 * ceiling
        print(f"best: {best_label.removeprefix('sink e2e, ')}: best {top:,.0f}, median {med:,.0f} rows/s "
              f"= {med / ceiling:.2f}x the columns ceiling; target >= 300,000 rows/s and >= 0.7x: "
              f"{'MET' if met else 'NOT MET'} (by the median)")
        store.close()
    finally:
        if broker_cmd:
            subprocess.run([*broker_cmd, "stop"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
