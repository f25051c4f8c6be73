"""`fdpass sink`: argument parsing only; the work lives in consumer.py and store.py.

No heavy imports at module level: fdpass/cli.py registers every sub-command
on each start, also for `fdpass --help`.
"""

from __future__ import annotations

import argparse
import logging

from fdpass import defaults
from fdpass.sinks.store import add_store_args


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def _positive_float(s: str) -> float:
    v = float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def _bytes(s: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    s = s.strip().lower().rstrip("ib").rstrip("i")
    mult = units.get(s[-1:], 1)
    num = s[:-1] if s[-1:] in units else s
    try:
        v = int(float(num) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {s!r} (e.g. 32M)") from None
    if v <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


def register(sub) -> None:
    p = sub.add_parser(
        "sink", help="consume fdpass events from Kafka into ClickHouse, exactly once",
        description="Consume Avro fdpass events from Kafka and insert them into ClickHouse exactly once "
                    "(offset ranges recorded in the store; see sinks/exactly_once.py). Undecodable messages and rows "
                    "ClickHouse rejects go to a dead-letter topic. SIGTERM/SIGINT flush and exit; a second "
                    "signal exits at once (nothing unstored is committed).",
    )
    p.add_argument("--kafka", metavar="HOST:PORT", required=True, help="bootstrap servers")
    p.add_argument("--topic", default=defaults.TOPIC, help="topic (default %(default)s)")
    p.add_argument("--group", default="fdpass-sink", help="consumer group (run N sinks with one group to share partitions)")
    p.add_argument("--dlq-topic", help="dead-letter topic (default: TOPIC.dlq)")
    p.add_argument("--kafka-config", metavar="FILE",
                   help="librdkafka properties, key=value lines (SASL, TLS...); also FDPASS_KAFKA_<PROP> "
                        "environment variables. Never put secrets on the command line")
    add_store_args(p)
    p.add_argument("--batch-rows", type=_positive_int, default=100_000, help="close a batch at this many messages (%(default)s)")
    p.add_argument("--batch-bytes", type=_bytes, default=32 << 20, help="... or at this many bytes (32M)")
    p.add_argument("--batch-age", type=_positive_float, default=1.0, help="... or after this many seconds (%(default)s)")
    p.add_argument("--ttl-days", type=int, default=None, help="drop events older than this (applied when the table is created)")
    p.add_argument("--status-every", type=_positive_float, default=10.0, help="seconds between status lines")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics here (e.g. 0.0.0.0:9465)")
    from fdpass import logs

    logs.add_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=run_sink)


def run_sink(args) -> int:
    import signal
    import threading

    from fdpass import kafka
    from fdpass.sinks.consumer import Sink, SinkConfig, tune_gc
    from fdpass.sinks.store import open_store

    from fdpass import logs

    logs.setup("sink", args.verbose, args.log_format)
    logs.quiet_client_libraries()
    log = logging.getLogger("fdpass.sink")
    stop, abandon = threading.Event(), threading.Event()

    def on_signal(signum, _frame):
        if stop.is_set():
            log.warning("second %s: abandoning unstored batches (not committed; re-read on restart)",
                        signal.Signals(signum).name)
            abandon.set()
        else:
            log.info("%s: flushing and stopping (again to abandon)", signal.Signals(signum).name)
            stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cfg = SinkConfig(
        bootstrap=args.kafka, topic=args.topic, group=args.group, dlq_topic=args.dlq_topic,
        batch_rows=args.batch_rows, batch_bytes=args.batch_bytes, batch_age=args.batch_age,
        status_every=args.status_every, kafka_conf=kafka.properties(args.kafka_config), ttl_days=args.ttl_days,
    )
    tune_gc()
    with open_store(args.clickhouse, args.clickhouse_password_file) as store:
        sink = Sink(cfg, store, stop=stop, abandon=abandon)
        if args.metrics:
            from fdpass import metrics

            metrics.serve(args.metrics, {"sink": sink.metrics})
        return sink.run()
