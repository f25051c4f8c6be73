"""The sink against a real Kafka broker and a real embedded ClickHouse (chDB). No mocks.

Sinks run either as `fdpass sink` subprocesses (so they can be killed with
SIGKILL) or as threads of this process (to share one chDB store: chDB opens
a store from one process only).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
import urllib.request

import pytest

from fdpass.schemas import avro, codec, synthetic
from fdpass.schemas import clickhouse as ddl
from fdpass.sinks.consumer import SinkConfig
from tests.fixtures_clickhouse import (
    FAST_GROUP_ENV, SinkProcess, ThreadSink, all_committed, committed_offsets, consume_all, create_topic,
    end_offsets, produce, query_json, unique, wait_until,
)

pytestmark = pytest.mark.kafka

N = 20_000


def events(n: int, start: int = 0) -> list[dict]:
    return [synthetic.make_event(i, host=f"node-{i % 5}") for i in range(start, start + n)]


def encode_all(evs: list[dict]) -> tuple[list[bytes], list[bytes]]:
    return [codec.encode(e) for e in evs], [e["host_id"].encode() + str(i % 16).encode() for i, e in enumerate(evs)]


def counts(store) -> tuple[int, int]:
    row = query_json(store, "SELECT count() AS n, uniqExact(event_id) AS u FROM fdpass.events")[0]
    return int(row["n"]), int(row["u"])


def test_n_events_land_exactly_once(kafka_broker, store_dir, tmp_path):
    topic = unique("t-n")
    create_topic(kafka_broker.bootstrap, topic, 4)
    evs = events(N)
    produce(kafka_broker.bootstrap, topic, *encode_all(evs))
    from tests.fixtures_kafka import free_port

    port = free_port()
    sink = SinkProcess(kafka_broker.bootstrap, topic, store_dir, tmp_path / "sink.log",
                       "--group", unique("g"), "--metrics", f"127.0.0.1:{port}", env=FAST_GROUP_ENV).start()
    sink.wait_for_log(f"sink: {N} rows stored", timeout=90)
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert f"fdpass_sink_rows_stored_total {float(N)}" in scrape, scrape
    assert "fdpass_sink_consumer_lag 0.0" in scrape
    assert "fdpass_sink_insert_latency_seconds" in scrape
    assert sink.stop() == 0, sink.log()[-3000:]
    assert counts(store_dir) == (N, N)
    ids = {r["event_id"] for r in query_json(store_dir, "SELECT event_id FROM fdpass.events")}
    assert ids == {e["event_id"] for e in evs}


def test_kill_9_three_times_while_working(kafka_broker, store_dir, tmp_path):
    """SIGKILL at random moments while events keep arriving; batches close by age with varying ranges."""
    topic, group = unique("t-kill"), unique("g-kill")
    partitions = 3
    create_topic(kafka_broker.bootstrap, topic, partitions)
    values, keys = encode_all(events(N))
    rng = random.Random()

    def producer():  # ~25 s of steady arrivals, so every kill lands mid-stream
        from confluent_kafka import Producer

        p = Producer({"bootstrap.servers": kafka_broker.bootstrap, "enable.idempotence": True, "linger.ms": 5})
        for i in range(0, N, 200):
            for v, k in zip(values[i:i + 200], keys[i:i + 200]):
                p.produce(topic, v, key=k)
            p.flush(30)
            time.sleep(0.25)
        assert p.flush(30) == 0

    feeder = threading.Thread(target=producer, daemon=True)
    feeder.start()
    log_path = tmp_path / "sink.log"
    # Small batches cut by age: many batches, and the sink spends much of its
    # time between recording a range, inserting it and committing it -- where
    # a kill leaves a range to re-form.
    args = ("--group", group, "--batch-rows", "200", "--batch-age", "0.05")
    at_kill = []
    for _ in range(3):
        seen = len(log_path.read_text()) if log_path.exists() else 0
        sink = SinkProcess(kafka_broker.bootstrap, topic, store_dir, log_path, *args, env=FAST_GROUP_ENV).start()
        wait_until(lambda: "assigned" in log_path.read_text()[seen:], 60, "this run's partition assignment")
        time.sleep(rng.uniform(0.5, 2.5))
        sink.kill9()
        n, u = counts(store_dir)
        assert n == u, f"duplicates after a kill: {n} rows, {u} distinct event_ids"
        at_kill.append(n)
    feeder.join(60)
    seen = len(log_path.read_text())
    sink = SinkProcess(kafka_broker.bootstrap, topic, store_dir, log_path, *args, env=FAST_GROUP_ENV).start()
    # (the earlier runs may have stored everything already: wait until this one
    # is up, so the SIGTERM below tests a clean stop rather than a start-up)
    wait_until(lambda: "assigned" in log_path.read_text()[seen:], 60, "the last run's partition assignment")
    wait_until(lambda: all_committed(kafka_broker.bootstrap, group, topic, partitions), 120,
               "every offset committed after the last restart", interval=1)
    assert sink.stop() == 0
    assert counts(store_dir) == (N, N), f"rows at each kill: {at_kill}"
    assert any(0 < n < N for n in at_kill), f"no kill landed mid-work: {at_kill}"
    print("rows at each kill:", at_kill, "re-formed ranges:", log_path.read_text().count("re-forming"))


def test_replay_re_forms_the_recorded_ranges(kafka_broker, open_store):
    """The trap, made deterministic: batches stored but never committed are re-formed exactly.

    A 'previous run' stored offsets 0-299 as one batch (recorded, inserted,
    died before marking it done) and 300-399 as another (recorded, inserted,
    marked done, died before the commit). The new run cuts batches of 64:
    without the recorded ranges it would insert 0-63, 64-127, ... with new
    tokens and double all 400 rows.
    """
    from confluent_kafka import Consumer

    from fdpass.sinks.exactly_once import Batch, BatchLog
    from fdpass.sinks.writer import Writer

    topic, group = unique("t-trap"), unique("g-trap")
    create_topic(kafka_broker.bootstrap, topic, 1)
    produce(kafka_broker.bootstrap, topic, *encode_all(events(500)))
    store = open_store()
    client = store.client()
    ddl.ensure_schema(client)
    c = Consumer({"bootstrap.servers": kafka_broker.bootstrap, "group.id": group, "auto.offset.reset": "earliest",
                  "enable.auto.commit": False})
    c.subscribe([topic])
    msgs = []
    wait_until(lambda: msgs.extend(m for m in c.consume(500, 0.5) if m.error() is None) or len(msgs) >= 400, 30, "400 msgs")
    c.close()  # no commit: the 'crash'
    log = BatchLog(client, "fdpass", topic)
    w = Writer(client, "fdpass", "events")

    def batch(a, b):
        part = msgs[a:b + 1]
        return Batch(topic, 0, a, b, [m.value() for m in part], [m.key() for m in part], [m.offset() for m in part])

    log.intent(0, 0, 299, 300)
    v = avro.CURRENT_VERSION
    assert w._insert_group(batch(0, 299), v, None, f"{topic}/0/0-299/v{v}") == (300, [], [])  # the writer's own tokens
    log.intent(0, 300, 399, 100)
    assert w._insert_group(batch(300, 399), v, None, f"{topic}/0/300-399/v{v}") == (100, [], [])
    log.done(0, 300, 399, 100)
    assert client.query("SELECT count() FROM fdpass.events").result_rows == [(400,)]

    sink = ThreadSink(store, SinkConfig(bootstrap=kafka_broker.bootstrap, topic=topic, group=group,
                                        batch_rows=64, batch_age=0.2)).start()
    wait_until(lambda: all_committed(kafka_broker.bootstrap, group, topic, 1), 60, "all committed")
    assert sink.stop() == 0
    assert client.query("SELECT count(), uniqExact(event_id) FROM fdpass.events").result_rows == [(500, 500)]
    stats = sink.sink.stats
    assert (stats["replayed"], stats["skipped_done"]) == (2, 1)
    assert stats["rows"] == 300 + 100  # 0-299 sent again (dropped by its token); 400-499 new; 300-399 not sent


def test_recorded_ranges_of_an_assignment_are_read_in_one_query(open_store):
    from fdpass.sinks.exactly_once import BatchLog, Range

    c = open_store().client()
    ddl.ensure_schema(c)
    log = BatchLog(c, "fdpass", "t-many")
    log.intent(0, 0, 9, 10)
    log.done(0, 0, 9, 10)
    log.intent(0, 10, 19, 10)
    log.intent(1, 5, 7, 3)
    log.intent(1, 6, 8, 3)  # overlaps: replaying the first only
    BatchLog(c, "fdpass", "t-other").intent(2, 0, 5, 6)  # another topic's
    assert log.pending_many({0: 10, 1: 0, 2: 0}) == {0: [Range(10, 19, False)], 1: [Range(5, 7, False)], 2: []}
    assert log.pending(0, 0) == [Range(0, 9, True), Range(10, 19, False)]


@pytest.mark.parametrize("native", [True, False], ids=["native", "avro-fallback"])
def test_poison_messages_go_to_the_dlq_with_their_reason(kafka_broker, open_store, native):
    """Both insert paths: Native blocks (the transcoder leaves undecodable messages out) and the Avro
    containers of a sink without the C extension (ClickHouse refuses the container, the codec sorts)."""
    topic, group = unique("t-poison"), unique("g-poison")
    create_topic(kafka_broker.bootstrap, topic, 1)  # one partition: offset = position in `values`
    evs = events(3000)
    values = [codec.encode(e) for e in evs]
    good = values[7]
    unknown_fp = codec.MAGIC + bytes(8) + good[codec.HEADER_LEN:]
    no_id = codec.encode({**evs[0], "event_id": ""})  # decodes fine; ClickHouse's CHECK rejects it
    poison = {
        100: b"not an avro message",
        200: b"",
        300: unknown_fp,
        400: good[: len(good) // 2],  # truncated
        500: good[: codec.HEADER_LEN] + b"\xff" * 40,  # garbage body
        600: good[: codec.HEADER_LEN] + b"\x01" + good[codec.HEADER_LEN + 1:],  # negative string length
        700: no_id,
        2999: b"\xc3",  # short header, last message
    }
    expected = {}
    for i, v in poison.items():
        try:
            codec.decode(v)
            expected[i] = "clickhouse_rejected"
        except codec.CodecError as e:
            expected[i] = e.reason
    assert expected[700] == "clickhouse_rejected"
    assert {"bad_magic", "unknown_fingerprint", "truncated", "corrupt_body"} <= set(expected.values())
    stream = [poison.get(i, v) for i, v in enumerate(values)]
    produce(kafka_broker.bootstrap, topic, stream)
    store = open_store()
    sink = ThreadSink(store, SinkConfig(bootstrap=kafka_broker.bootstrap, topic=topic, group=group, batch_rows=1000,
                                        native=native)).start()
    wait_until(lambda: all_committed(kafka_broker.bootstrap, group, topic, 1), 90, "all committed")
    assert sink.stop() == 0
    dead = consume_all(kafka_broker.bootstrap, topic + ".dlq", expect=len(poison))
    assert len(dead) == len(poison)  # each once (a crash could repeat one; this run had none)
    got = {}
    for m in dead:
        h = {k: v.decode() for k, v in m.headers()}
        assert h["fdpass.original.topic"] == topic and h["fdpass.original.partition"] == "0"
        off = int(h["fdpass.original.offset"])
        assert (m.value() or b"") == stream[off]
        got[off] = h["fdpass.reason"]
        assert h["fdpass.detail"]
    assert got == expected
    c = store.client()
    stored = {r[0] for r in c.query("SELECT event_id FROM fdpass.events").result_rows}
    assert stored == {e["event_id"] for i, e in enumerate(evs) if i not in poison}
    assert c.query("SELECT count() FROM fdpass.events").result_rows == [(len(evs) - len(poison),)]
    assert sink.sink.dlq.counts == Counter(expected.values())


def test_two_sinks_in_one_group_share_the_partitions(kafka_broker, open_store):
    """Two consumers of one group in one process, sharing one chDB store (chDB: one process per store).

    Each sink has its own Kafka consumer (own group member) and its own
    ClickHouse clients; only the store is shared -- as two sink processes
    share one ClickHouse server. Events keep arriving while B joins (A's
    partitions are revoked and split) and while A leaves (B takes them all).
    """
    topic, group = unique("t-two"), unique("g-two")
    create_topic(kafka_broker.bootstrap, topic, 4)
    store = open_store()
    cfg = SinkConfig(bootstrap=kafka_broker.bootstrap, topic=topic, group=group, batch_rows=500, batch_age=0.1,
                     kafka_conf={"session.timeout.ms": 6000})
    values, keys = encode_all(events(N))
    chunks = [(values[i:i + 1000], keys[i:i + 1000]) for i in range(0, N, 1000)]

    def feed(k):
        for v, key in chunks[k * 5:(k + 1) * 5]:
            produce(kafka_broker.bootstrap, topic, v, key)

    a = ThreadSink(store, cfg).start()
    wait_until(lambda: a.sink.assigned_history, 60, "sink A assigned")
    feed(0)
    b = ThreadSink(store, cfg).start()
    feeder = threading.Thread(target=feed, args=(1,))
    feeder.start()  # arriving while the group rebalances
    wait_until(lambda: b.sink.buffers and a.sink.buffers and len(a.sink.buffers) + len(b.sink.buffers) == 4,
               60, "partitions split between A and B")
    feeder.join()
    pa, pb = set(a.sink.buffers), set(b.sink.buffers)
    feed(2)
    wait_until(lambda: a.sink.stats["rows"] > 0 and b.sink.stats["rows"] > 0, 60, "both sinks storing")
    feeder = threading.Thread(target=feed, args=(3,))
    feeder.start()
    assert a.stop() == 0  # A leaves mid-stream: B gets every partition
    feeder.join()
    wait_until(lambda: all_committed(kafka_broker.bootstrap, group, topic, 4), 90, "all committed", interval=0.5)
    assert b.stop() == 0
    assert pa and pb and not (pa & pb) and pa | pb == {0, 1, 2, 3}
    assert b.sink.assigned_history[-1] == {0, 1, 2, 3}
    assert a.sink.stats["rows"] > 0 and b.sink.stats["rows"] > 0
    c = store.client()
    assert c.query("SELECT count(), uniqExact(event_id) FROM fdpass.events").result_rows == [(N, N)]


@pytest.mark.parametrize("native", [True, False], ids=["native", "avro-fallback"])
def test_schema_evolution_v1_messages_get_defaults(kafka_broker, open_store, native):
    """A store created by a v1-era sink is migrated; v1, v2 and v3 messages land side by side (in every
    batch: they take turns), on both insert paths."""
    topic, group = unique("t-evo"), unique("g-evo")
    create_topic(kafka_broker.bootstrap, topic, 2)
    store = open_store()
    c = store.client()
    v1_fields = ddl.FIELDS[: [f.name for f in ddl.FIELDS].index("probe") + 1]
    for stmt in ddl.create_statements(fields=v1_fields):
        c.command(stmt)
    encoders = [codec.Encoder(v) for v in (1, 2, 3)]
    evs = events(2000)
    for i, e in enumerate(evs):
        e.update(seq=i + 1, msg_index=1, path_truncated=True, abi="X32", file_verified=True, transfer_id=i)
    values = [encoders[i % 3].encode(e) for i, e in enumerate(evs)]
    # both partitions get messages of both versions (keyless messages could all stick to one
    # partition, and an empty partition is never committed)
    produce(kafka_broker.bootstrap, topic, values, partition_of=lambda i: i // 2 % 2)
    sink = ThreadSink(store, SinkConfig(bootstrap=kafka_broker.bootstrap, topic=topic, group=group,
                                        batch_age=0.2, native=native)).start()
    wait_until(lambda: all_committed(kafka_broker.bootstrap, group, topic, 2), 60, "all committed")
    assert sink.stop() == 0
    rows = c.query("SELECT event_id, seq, msg_index, path_truncated, exe, file_type, abi, file_verified, transfer_id "
                   "FROM fdpass.events").result_rows
    assert len(rows) == 2000
    by_id = {r[0]: r[1:] for r in rows}
    for i, e in enumerate(evs):
        seq, msg_index, trunc, exe, ftype, *v3 = by_id[e["event_id"]]
        assert (exe, ftype) == (e["exe"], e["file_type"])
        if i % 3 == 0:  # written with v1: the fields v1 lacks take their defaults
            assert (seq, msg_index, trunc) == (0, 0, False)
        else:
            assert (seq, msg_index, trunc) == (i + 1, 1, True)
        if i % 3 == 2:
            assert v3 == ["X32", True, i]
        else:  # v1 and v2: what the current reader gives them
            assert v3 == ["X86_64", False, None]


def test_insert_failure_commits_nothing_and_loses_nothing(kafka_broker, open_store):
    topic, group = unique("t-fail"), unique("g-fail")
    create_topic(kafka_broker.bootstrap, topic, 2)
    store = open_store()
    c = store.client()
    ddl.ensure_schema(c)
    sink = ThreadSink(store, SinkConfig(bootstrap=kafka_broker.bootstrap, topic=topic, group=group,
                                        batch_rows=1000, batch_age=0.2)).start()
    wait_until(lambda: sink.sink.assigned_history, 60, "assignment")
    c.command("RENAME TABLE fdpass.events TO fdpass.events_away")  # the table is gone: every insert fails
    evs = events(5000)
    produce(kafka_broker.bootstrap, topic, *encode_all(evs))
    wait_until(lambda: sink.sink.retrying, 30, "the writer to start retrying")
    time.sleep(3)  # several failed attempts
    assert sink.sink.retrying
    assert all(o < 0 for o in committed_offsets(kafka_broker.bootstrap, group, topic, 2).values())
    assert sink.sink.stats["rows"] == 0
    c.command("RENAME TABLE fdpass.events_away TO fdpass.events")  # fixed
    wait_until(lambda: all_committed(kafka_broker.bootstrap, group, topic, 2), 90, "all committed after the fix")
    assert sink.stop() == 0
    assert c.query("SELECT count(), uniqExact(event_id) FROM fdpass.events").result_rows == [(5000, 5000)]
    assert end_offsets(kafka_broker.bootstrap, topic, 2) == committed_offsets(kafka_broker.bootstrap, group, topic, 2)
