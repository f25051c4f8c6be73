"""Sink throughput: Kafka -> chDB end to end, against inserting the same rows straight into chDB.

    .venv/bin/python bench/bench_sink.py [--events 400000] [--partitions 4] [--batch-rows 10000,50000,100000]
                                         [--kafka HOST:PORT]

Without --kafka a broker is started with scripts/kafka-local on a free port
(fresh data dir, stopped at the end). In one run it measures:

  ceiling, columns   clickhouse-connect inserting the decoded events as column
                     lists (client.insert, column_oriented) -- the usual way to
                     feed ClickHouse from Python; the brief's ceiling
  ceiling, Avro      clickhouse-connect inserting the same messages as Avro
                     containers (what the sink sends), no Kafka
  sink e2e           the real sink (consumer thread + writer thread, state
                     rows, commits) from the first assignment until every
                     row is stored, per --batch-rows value

and prints rows/s and the ratio sink / ceiling. Same process, same chDB store.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=400_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--batch-rows", default="10000,50000,100000")
    ap.add_argument("--writers", default="2", help="writer threads to try, comma-separated (default 2)")
    ap.add_argument("--kafka", help="use this broker instead of starting one")
    args = ap.parse_args()

    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    from fdpass.schemas import clickhouse as ddl
    from fdpass.schemas import codec, synthetic
    from fdpass.schemas.avro import CURRENT_VERSION
    from fdpass.schemas.fields import FIELD_NAMES
    from fdpass.sinks import conversion
    from fdpass.sinks.consumer import Sink, SinkConfig, tune_gc
    from fdpass.sinks.store import open_store

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
        p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.size": 1 << 20,
                      "compression.type": "lz4", "queue.buffering.max.messages": 1_000_000})
        t = time.perf_counter()
        for v, k in zip(values, keys):
            while True:
                try:
                    p.produce(topic, v, key=k)
                    break
                except BufferError:
                    p.poll(0.05)
        assert p.flush(120) == 0
        print(f"produced to {topic} ({args.partitions} partitions) in {time.perf_counter() - t:.1f}s", flush=True)

        tune_gc()  # as `fdpass sink` does
        store = open_store(f"chdb://{tmp / 'store'}")
        client = store.client()
        ddl.ensure_schema(client)
        batch_sizes = [int(x) for x in args.batch_rows.split(",")]
        ref_batch = 50_000

        # -- ceilings -------------------------------------------------------------
        decoded = [codec.decode(v) for v in values]
        cols = conversion.events_to_columns(decoded)
        t, cpu = time.perf_counter(), time.process_time()
        for i in range(0, n, ref_batch):
            client.insert("fdpass.events", [c[i:i + ref_batch] for c in cols], column_names=list(FIELD_NAMES),
                          column_oriented=True)
        ceiling_cols = n / (time.perf_counter() - t)
        cpu_cols = (time.process_time() - cpu) / n * 1e6
        client.command("TRUNCATE TABLE fdpass.events")
        settings = {"input_format_avro_allow_missing_fields": 1}
        t, cpu = time.perf_counter(), time.process_time()
        for i in range(0, n, ref_batch):
            data = conversion.avro_container(CURRENT_VERSION, values[i:i + ref_batch])
            client.raw_insert("fdpass.events", insert_block=data, fmt="Avro", settings=settings)
        ceiling_avro = n / (time.perf_counter() - t)
        cpu_avro = (time.process_time() - cpu) / n * 1e6
        client.command("TRUNCATE TABLE fdpass.events")
        print(f"load average before the sink runs: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs "
              "(rates swing with other work on the machine; CPU us/row is steadier)")
        print(f"ceiling, columns (clickhouse-connect insert of column lists): {ceiling_cols:>10,.0f} rows/s  "
              f"{cpu_cols:5.1f} CPU us/row")
        print(f"ceiling, Avro    (clickhouse-connect raw insert, no Kafka):   {ceiling_avro:>10,.0f} rows/s  "
              f"{cpu_avro:5.1f} CPU us/row", flush=True)

        # -- the sink ---------------------------------------------------------------
        results = []
        runs = [(rows, w) for w in (int(x) for x in args.writers.split(",")) for rows in batch_sizes]
        for rows, writers in runs:
            client.command("TRUNCATE TABLE fdpass.events")
            client.command("TRUNCATE TABLE fdpass.sink_batches")
            cfg = SinkConfig(bootstrap=bootstrap, topic=topic, group=f"bench-{rows}-{writers}-{os.getpid()}",
                             batch_rows=rows, writers=writers, status_every=3600)
            sink = Sink(cfg, store)
            th = threading.Thread(target=sink.run, daemon=True)
            th.start()
            while not sink.assigned_history:
                time.sleep(0.01)
            t, cpu = time.perf_counter(), time.process_time()
            while sink.stats["rows"] < n:
                time.sleep(0.01)
                if not th.is_alive():
                    raise SystemExit("sink stopped early")
            dt = time.perf_counter() - t
            cpu_sink = (time.process_time() - cpu) / n * 1e6
            sink.stop.set()
            th.join(60)
            got = client.query("SELECT count(), uniqExact(event_id) FROM fdpass.events").result_rows[0]
            assert got == (n, n), got
            rate = n / dt
            results.append((f"--batch-rows {rows}, {writers} writers", rate))
            print(f"sink e2e, --batch-rows {rows:>6}, {writers} writers: {rate:>10,.0f} rows/s  {cpu_sink:5.1f} CPU us/row  "
                  f"= {rate / ceiling_cols:.2f}x columns ceiling, {rate / ceiling_avro:.2f}x Avro ceiling "
                  f"({sink.stats['batches']} batches)", flush=True)
        best = max(results, key=lambda r: r[1])
        print(f"best: {best[0]}: {best[1]:,.0f} rows/s; target >= 300,000 rows/s and >= 0.7x ceiling: "
              f"{'MET' if best[1] >= 300_000 and best[1] >= 0.7 * ceiling_cols else 'NOT MET'} "
              f"(vs columns ceiling {best[1] / ceiling_cols:.2f}x, vs Avro ceiling {best[1] / ceiling_avro:.2f}x)")
        store.close()
    finally:
        if broker_cmd:
            subprocess.run([*broker_cmd, "stop"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
