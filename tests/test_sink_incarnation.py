"""A topic recreated, a cluster replaced: the sink starts over on the new incarnation (sinks/incarnation.py).

Real brokers (scripts/kafka-local), the real sink in a thread, chDB. The new
topic's offsets start again at 0: without the topic id in the batch log,
the tokens and the commits, its events would be skipped (ranges the old
topic recorded done, tokens in ClickHouse's dedup window, or librdkafka
fetching on at the old topic's offset).
"""

from __future__ import annotations

import shutil
import time

import pytest

from fdpass.schemas import clickhouse as ddl
from fdpass.schemas import codec, synthetic
from fdpass.sinks.consumer import SinkConfig
from tests.fixtures_clickhouse import ThreadSink, all_committed, create_topic, produce, unique, wait_until

pytestmark = pytest.mark.kafka


def encoded(start: int, n: int) -> tuple[list[bytes], list[bytes]]:
    evs = [synthetic.make_event(i, host=f"node-{i % 4}") for i in range(start, start + n)]
    return [codec.encode(e) for e in evs], [f"k{i % 8}".encode() for i in range(start, start + n)]


def expected_ids(start: int, n: int) -> set[str]:
    return {synthetic.make_event(i, host=f"node-{i % 4}")["event_id"] for i in range(start, start + n)}


def stored_ids(client) -> tuple[int, set[str]]:
    rows = client.query("SELECT event_id FROM fdpass.events").result_rows
    return len(rows), {r[0] for r in rows}


def recreate(bootstrap: str, topic: str, partitions: int) -> None:
    """Delete the topic and create it again at once (the deletion completes in the background)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.delete_topics([topic])[topic].result(30)
    deadline = time.monotonic() + 60
    while True:
        try:
            create_topic(bootstrap, topic, partitions)
            return
        except KafkaException:  # TOPIC_ALREADY_EXISTS while the deletion completes
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_recreated_topic_is_stored_from_its_first_offset_exactly_once(kafka_broker, open_store):
    """The topic is deleted and created again while the sink reads it, and the new one gets more
    events than the old had: librdkafka alone would go on fetching at the old offsets (skipping the
    new topic's first ones), and the old batch log and tokens would match the new offsets."""
    bs = kafka_broker.bootstrap
    topic, group = unique("t-recreated"), unique("g-recreated")
    create_topic(bs, topic, 2)
    store = open_store()
    sink = ThreadSink(store, SinkConfig(bootstrap=bs, topic=topic, group=group, batch_rows=50,
                                        batch_age=0.2)).start()
    produce(bs, topic, *encoded(0, 300))
    wait_until(lambda: all_committed(bs, group, topic, 2), 60, "the old topic stored and committed")
    client = store.client()
    assert stored_ids(client)[0] == 300

    recreate(bs, topic, 2)
    produce(bs, topic, *encoded(300, 700))
    try:
        wait_until(lambda: stored_ids(client)[0] >= 1000 and all_committed(bs, group, topic, 2), 90,
                   "the new topic stored and committed")
        time.sleep(2)  # anything stored twice would show up now
    finally:
        assert sink.stop() == 0
    n, ids = stored_ids(client)
    assert (n, len(ids)) == (1000, 1000) and ids == expected_ids(0, 1000)
    # the new topic's ranges are recorded under its own id, apart from the old one's
    ids_recorded = client.query(f"SELECT uniqExact(topic_id) FROM fdpass.sink_batches WHERE topic = '{topic}' "
                                "AND topic_id != ''").result_rows[0][0]
    assert ids_recorded == 2, ids_recorded


def test_replaced_cluster_is_stored_from_its_first_offset_exactly_once(open_store, tmp_path):
    """The cluster at the sink's address is replaced by a new, empty one (same port, new cluster id,
    the topic created afresh): the sink's consumer, which refuses the new cluster, is replaced, and
    every event of the new cluster is stored once."""
    from tests.fixtures_kafka import LocalKafka, free_port, fresh_data_dir

    port = free_port()
    dirs = [fresh_data_dir("sink-replaced") for _ in range(2)]
    old, new = LocalKafka(dirs[0], port), LocalKafka(dirs[1], port)
    topic, group = unique("t-replaced"), unique("g-replaced")
    old.start()
    sink = None
    try:
        create_topic(old.bootstrap, topic, 2)
        store = open_store()
        client = store.client()
        sink = ThreadSink(store, SinkConfig(bootstrap=old.bootstrap, topic=topic, group=group, batch_rows=50,
                                            batch_age=0.2)).start()
        produce(old.bootstrap, topic, *encoded(0, 300))
        wait_until(lambda: all_committed(old.bootstrap, group, topic, 2), 60, "the old cluster's events stored")
        old.stop()
        new.start()
        create_topic(new.bootstrap, topic, 2)
        produce(new.bootstrap, topic, *encoded(300, 200))
        wait_until(lambda: stored_ids(client)[0] >= 500 and all_committed(new.bootstrap, group, topic, 2), 120,
                   "the new cluster's events stored and committed")
        time.sleep(2)
        assert sink.stop() == 0
        sink_stats, sink = sink.sink.stats, None
        n, ids = stored_ids(client)
        assert (n, len(ids)) == (500, 500) and ids == expected_ids(0, 500)
        assert sink_stats["started_over"] >= 1, sink_stats
    finally:
        if sink is not None:
            sink.sink.stop.set()
        for broker in (old, new):
            if broker.is_running():
                broker.stop()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def test_ranges_of_another_incarnation_are_not_replayed(open_store):
    from fdpass.sinks.exactly_once import BatchLog, Range, token

    c = open_store().client()
    ddl.ensure_schema(c)
    log = BatchLog(c, "fdpass", "t-inc")
    log.intent(0, 0, 99, 100, "old")
    log.done(0, 0, 99, 100, "old")
    log.intent(0, 100, 199, 100, "old")
    log.intent(0, 0, 49, 50, "new")
    log.intent(1, 0, 9, 10)  # recorded before ids were: this incarnation's while no range with an id follows
    log.intent(2, 0, 9, 10)
    log.intent(2, 10, 19, 10, "old")  # ... history once one does
    assert log.pending_many({0: 0, 1: 0, 2: 0}, "new") == {0: [Range(0, 49, False, "new")],
                                                          1: [Range(0, 9, False, "")], 2: []}
    assert log.pending_many({0: 0}, "old")[0] == [Range(0, 99, True, "old"), Range(100, 199, False, "old")]
    # the tokens of two incarnations never match; a range without an id keeps its old token
    assert token("t", 0, 0, 9, "/v3", "new") != token("t", 0, 0, 9, "/v3", "old")
    assert token("t", 0, 0, 9, "/v3") == "t/0/0-9/v3"


def test_an_old_sink_batches_table_gets_the_topic_id_column(open_store):
    c = open_store().client()
    c.command("CREATE DATABASE IF NOT EXISTS fdpass")
    c.command(f"CREATE TABLE fdpass.{ddl.STATE_TABLE} (topic LowCardinality(String), partition Int32, "
              "first_offset Int64, last_offset Int64, messages UInt32, phase Enum8('intent' = 1, 'done' = 2), "
              "sink String, at DateTime64(3, 'UTC') DEFAULT now64(3)) ENGINE = MergeTree "
              "ORDER BY (topic, partition, last_offset)")
    c.command(f"INSERT INTO fdpass.{ddl.STATE_TABLE} (topic, partition, first_offset, last_offset, messages, phase, "
              "sink) VALUES ('t', 0, 0, 9, 10, 'intent', 'x')")
    alters = ddl.ensure_schema(c)
    assert any("topic_id" in a for a in alters), alters
    assert ddl.ensure_schema(c) == []  # once
    from fdpass.sinks.exactly_once import BatchLog, Range

    assert BatchLog(c, "fdpass", "t").pending(0, 0, "some-id") == [Range(0, 9, False, "")]
