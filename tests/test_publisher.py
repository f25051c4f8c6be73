"""KafkaPublisher against a real Apache Kafka broker (tests/fixtures_kafka.py).

No mocks: events go through librdkafka to the broker and back through a
consumer, and outages are real broker stops.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
import uuid

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from fdpass import kafka
from fdpass.collector import publisher as pub
from fdpass.collector.publisher import KafkaPublisher
from fdpass.errors import UserError
from fdpass.schemas import codec
from fdpass.schemas.synthetic import make_event

pytestmark = pytest.mark.kafka

HOSTS = [f"{h:032x}" for h in range(1, 5)]


def events_for(n: int, start: int = 0) -> list[dict]:
    """n events spread over 4 hosts; `seq` is globally increasing (order checks use it)."""
    return [make_event(i, host_id=HOSTS[i % len(HOSTS)], host=f"node-{i % len(HOSTS)}")
            for i in range(start, start + n)]


def new_topic() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def consume_all(bootstrap: str, topic: str, expected: int, timeout: float = 60.0, linger: float = 1.5):
    """Every message of `topic` (all partitions, from the start), decoded.

    Reads until `expected` messages arrived, then `linger` s more so that a
    duplicate or extra message would be seen too.
    """
    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10)
    partitions = list(md.topics[topic].partitions)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "enable.partition.eof": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])  # offset 0 = beginning
    out = []
    deadline = time.monotonic() + timeout
    extra_until = None
    try:
        while time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                assert msg.error() is None, msg.error()
                out.append((msg.partition(), msg.offset(), msg.key(), codec.decode(msg.value())))
            if len(out) >= expected:
                extra_until = extra_until or time.monotonic() + linger
                if time.monotonic() >= extra_until:
                    break
    finally:
        consumer.close()
    return out


def assert_exactly(received, events):
    """Each event arrived exactly once, keyed by host_id, in publish order per host."""
    got_ids = [ev["event_id"] for _, _, _, ev in received]
    assert len(got_ids) == len(set(got_ids)), f"{len(got_ids) - len(set(got_ids))} duplicates"
    by_id = {e["event_id"]: e for e in events}
    missing = set(by_id) - set(got_ids)
    assert not missing, f"{len(missing)} of {len(events)} events never arrived"
    assert len(got_ids) == len(events), f"{len(got_ids) - len(events)} unexpected extra events"
    for part, off, key, ev in received:
        assert ev == by_id[ev["event_id"]]
        assert key == ev["host_id"].encode()
    per_host: dict[str, list] = {}
    for part, off, key, ev in sorted(received, key=lambda r: (r[0], r[1])):
        per_host.setdefault(ev["host_id"], []).append(ev["seq"])
    for host, seqs in per_host.items():
        assert seqs == sorted(seqs), f"host {host}: events out of order"


def make_publisher(broker, topic, spool_dir, **kw) -> KafkaPublisher:
    kw.setdefault("partitions", 3)
    return KafkaPublisher(broker.bootstrap, topic, spool_dir=str(spool_dir), **kw)


# --- happy path ----------------------------------------------------------------------
def test_round_trip_exactly_n_events(kafka_broker, tmp_path):
    topic = new_topic()
    events = events_for(5000)
    p = make_publisher(kafka_broker, topic, tmp_path / "spool")
    for e in events:
        p.publish(e)
    assert p.flush(30) == 0
    stats = p.stats()
    assert p.close(5) == 0
    assert stats["delivered"] == 5000 and stats["failed"] == 0 and stats["dropped"] == 0
    assert_exactly(consume_all(kafka_broker.bootstrap, topic, 5000), events)
    md = AdminClient({"bootstrap.servers": kafka_broker.bootstrap}).list_topics(topic, timeout=10)
    assert len(md.topics[topic].partitions) == 3  # created by the publisher as asked


def test_publish_encoded_and_existing_topic(kafka_broker, tmp_path):
    topic = new_topic()
    make_publisher(kafka_broker, topic, tmp_path / "a").close(1)  # creates it
    p = make_publisher(kafka_broker, topic, tmp_path / "b", create_topic=False)
    events = events_for(10)
    for e in events:
        p.publish_encoded(e["host_id"].encode(), codec.encode(e))
    assert p.close(10) == 0
    assert_exactly(consume_all(kafka_broker.bootstrap, topic, 10), events)


# --- outages ---------------------------------------------------------------------------
def test_outage_of_20s_loses_nothing_and_keeps_order(kafka_broker, tmp_path):
    topic = new_topic()
    # Small queue bound and stall time so that both ways into the spool are
    # taken within the test's 20 s outage.
    p = make_publisher(kafka_broker, topic, tmp_path / "spool", queue_max_messages=5000, stall_seconds=2)
    published: list[dict] = []
    stop = threading.Event()
    errors = []

    def keep_publishing():  # ~2000 events/s, as a busy host would produce
        seq = 0
        try:
            while not stop.is_set():
                for e in events_for(100, seq):
                    p.publish(e)
                    published.append(e)
                seq += 100
                time.sleep(0.05)
        except Exception as exc:  # surfaced by the main thread
            errors.append(exc)

    t = threading.Thread(target=keep_publishing)
    t.start()
    try:
        time.sleep(3)
        kafka_broker.stop()
        down_at = time.monotonic()
        try:
            time.sleep(20)
            during = p.stats()
        finally:  # later tests share this broker
            kafka_broker.start()
        outage = time.monotonic() - down_at
        time.sleep(5)
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert p.flush(60) == 0, p.stats()
    stats = p.stats()
    assert p.close(5) == 0
    assert outage >= 20
    assert during["spooled"] > 0, f"the outage never reached the spool: {during}"
    assert stats["replayed"] == stats["spooled"] and stats["dropped"] == 0 and stats["failed"] == 0
    assert stats["delivered"] == len(published)
    assert not list((tmp_path / "spool").glob("*.seg")), "delivered segments must be deleted"
    assert_exactly(consume_all(kafka_broker.bootstrap, topic, len(published)), published)


def test_spool_survives_publisher_restart(kafka_broker, tmp_path):
    topic = new_topic()
    spool = tmp_path / "spool"
    first = events_for(3000)
    p = make_publisher(kafka_broker, topic, spool, queue_max_messages=1000, stall_seconds=1)
    for e in first[:1000]:  # delivered while the broker is up
        p.publish(e)
    assert p.flush(30) == 0
    kafka_broker.stop()
    try:
        for e in first[1000:]:  # broker down: the queue fills, then the spool
            p.publish(e)
        undelivered = p.close(timeout=2)
        assert undelivered == 2000, p.stats()
        assert list(spool.glob("*.seg")), "close() must leave the undelivered events on disk"
    finally:
        kafka_broker.start()
    # A new process would do exactly this: a new publisher on the same spool dir.
    q = make_publisher(kafka_broker, topic, spool)
    later = events_for(500, 3000)
    for e in later:  # must queue behind the 2000 replayed ones
        q.publish(e)
    assert q.flush(60) == 0, q.stats()
    stats = q.stats()
    assert q.close(5) == 0
    # The 500 new events went through the spool too, behind the old ones.
    assert stats["replayed"] == 2500 and stats["spooled"] == 500 and stats["delivered"] == 2500
    assert not list(spool.glob("*.seg"))
    assert_exactly(consume_all(kafka_broker.bootstrap, topic, 3000), first + later)


def test_replay_settles_and_deletes_segment_by_segment(kafka_broker, tmp_path):
    """Successes are not reported one by one (delivery.report.only.error):
    a replayed segment is settled once the producer's queue has drained
    after its last record. So files go away one after another during the
    replay, not all at the end, and the counts stay exact."""
    from fdpass.collector.spool import Spool

    topic = new_topic()
    spool_dir = tmp_path / "spool"
    events = events_for(6000)
    spool = Spool(spool_dir, segment_bytes=64 << 10)  # ~170 events per segment
    for e in events:
        assert spool.append(e["host_id"].encode(), codec.encode(e), topic)
    spool.close()
    total = len(list(spool_dir.glob("*.seg")))
    assert total >= 30
    samples = []  # (segment files left, events replayed so far)
    stop = threading.Event()
    box = {}

    def watch():
        while not stop.is_set():
            p = box.get("p")
            if p is not None:
                samples.append((len(list(spool_dir.glob("*.seg"))), p.replayed))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        p = box["p"] = make_publisher(kafka_broker, topic, spool_dir)
        assert p.flush(60) == 0, p.stats()
        stats = p.stats()
        assert p.close(5) == 0
    finally:
        stop.set()
        watcher.join()
    assert stats["replayed"] == 6000 and stats["delivered"] == 6000 and stats["failed"] == 0
    assert stats["spool_pending"] == 0 and not list(spool_dir.glob("*.seg"))
    # Files were deleted while most of the spool was still to be replayed.
    early = [(files, replayed) for files, replayed in samples if files < total - 2 and replayed < 3000]
    assert early, f"no segment deleted before half the spool was replayed: {samples[::50]}"
    assert_exactly(consume_all(kafka_broker.bootstrap, topic, 6000), events)


def test_spooled_events_go_to_the_topic_they_were_meant_for(kafka_broker, tmp_path, caplog):
    """A collector restarted with another --topic replays what an earlier run
    spooled into that run's topic (created if missing), and sends its own
    events to its own: nothing lands in the wrong topic, nothing is lost."""
    from fdpass.collector.spool import Spool

    old, new = new_topic(), new_topic()
    spool_dir = tmp_path / "spool"
    earlier, later = events_for(300), events_for(200, 300)
    spool = Spool(spool_dir)
    for e in earlier:
        assert spool.append(e["host_id"].encode(), codec.encode(e), old)
    spool.close()
    with caplog.at_level(logging.WARNING, logger="fdpass.publisher"):
        p = make_publisher(kafka_broker, new, spool_dir)
    try:
        assert any(f"for topic(s) {old}: they are replayed there, not to {new}" in r.getMessage()
                   for r in caplog.records)
        for e in later:
            p.publish(e)
        assert p.flush(60) == 0, p.stats()
        stats = p.stats()  # the later events queue behind the spooled ones: all 500 go through it
        assert stats["replayed"] == 500 and stats["failed"] == 0 and stats["dropped"] == 0
    finally:
        p.close(5)
    assert_exactly(consume_all(kafka_broker.bootstrap, old, 300), earlier)
    assert_exactly(consume_all(kafka_broker.bootstrap, new, 200), later)


def test_full_spool_drops_newest_and_counts(kafka_broker, tmp_path, caplog):
    topic = new_topic()
    # A queue of 50 and a 20 kB spool: a burst of 2000 events cannot all fit.
    p = make_publisher(kafka_broker, topic, tmp_path / "spool", queue_max_messages=50,
                       spool_max_bytes=20_000, spool_segment_bytes=8_000)
    events = events_for(2000)
    with caplog.at_level(logging.WARNING, logger="fdpass.publisher"):
        for e in events:
            p.publish(e)
        assert p.flush(30) == 0
    stats = p.stats()
    p.close(5)
    assert stats["dropped"] > 0 and stats["spooled"] > 0
    assert stats["delivered"] + stats["dropped"] == 2000
    drop_lines = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert drop_lines and "spool full" in drop_lines[0].getMessage()
    received = consume_all(kafka_broker.bootstrap, topic, stats["delivered"])
    ids = {ev["event_id"] for *_, ev in received}
    assert_exactly(received, [e for e in events if e["event_id"] in ids])


# --- bad input ---------------------------------------------------------------------------
def args_for(bootstrap, tmp_path, *extra) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    pub.add_arguments(parser)
    return parser.parse_args(["--kafka", bootstrap, "--spool-dir", str(tmp_path / "spool"), *extra])


def warning_lines(caplog, level=logging.WARNING) -> list[str]:
    """What the collector's log shows at `level` and above. (pytest also
    captures non-propagating loggers, such as the publisher's silenced admin client: not shown.)"""
    return [r.getMessage() for r in caplog.records if r.levelno >= level and r.name != kafka.QUIET.name]


def test_unreachable_bootstrap_warns_spools_and_loses_nothing(tmp_path, caplog, monkeypatch):
    """A valid address nobody answers on is an outage, not bad input: the
    publisher warns (naming the address and the spool), runs, spools, repeats
    the warning while Kafka stays away, and keeps every event for the next run."""
    from fdpass.collector.spool import Spool
    from tests.fixtures_kafka import free_port

    monkeypatch.setattr(pub, "START_WARN_EVERY", 1.0)  # 30 s in production
    address = f"127.0.0.1:{free_port()}"
    spool = tmp_path / "spool"
    events = events_for(300)
    with caplog.at_level(logging.INFO, logger="fdpass.publisher"):
        t = time.monotonic()
        p = KafkaPublisher.from_args(args_for(address, tmp_path), environ={}, connect_timeout=2)
        assert time.monotonic() - t < 6
        try:
            for e in events:
                p.publish(e)
            time.sleep(2.5)
            stats = p.stats()
        finally:
            undelivered = p.close(timeout=1)
    warnings = warning_lines(caplog)
    assert warnings[0].startswith(f"Kafka at {address} did not answer within 2 s (Connect to ipv4#{address} "
                                  "failed: Connection refused)"), warnings  # with librdkafka's reason
    assert warnings[0].endswith(f"; events are spooled to {spool} and sent when it answers"), warnings
    assert any(w.startswith(f"Kafka at {address} has still not answered after") and f"300 events wait in {spool}" in w
               for w in warnings), warnings
    assert not any(w.startswith(("Kafka: ", "FAIL ")) for w in warnings), \
        "librdkafka's connection errors must not repeat the warning"
    assert stats["topic_check_pending"] is True and stats["delivered"] == 0 and stats["replayed"] == 0
    assert stats["spooled"] == 300 and stats["spool_pending"] == 300 and stats["dropped"] == 0
    assert undelivered == 300
    # Nothing lost: the next run finds all 300, in publish order.
    s = Spool(spool)
    try:
        got = []
        while (rec := s.read()) is not None:
            got.append((rec[2], rec[3]))
    finally:
        s.close()
    assert got == [(e["host_id"].encode(), codec.encode(e)) for e in events]


def test_kafka_down_at_start_then_up_delivers_everything_once_in_order(kafka_broker, tmp_path, caplog):
    topic = new_topic()  # does not exist yet: created in the background once Kafka answers
    missing = new_topic()  # never created: with --no-create-topic that is reported, not lost
    events = events_for(2000)
    with caplog.at_level(logging.INFO, logger="fdpass.publisher"):
        kafka_broker.stop()
        try:
            p = make_publisher(kafka_broker, topic, tmp_path / "spool", connect_timeout=2)
            q = make_publisher(kafka_broker, missing, tmp_path / "q", connect_timeout=2, create_topic=False)
            for e in events:
                p.publish(e)
                q.publish(e)
            during = p.stats()
            down_warnings = warning_lines(caplog)
        finally:  # later tests share this broker
            kafka_broker.start()
        try:
            assert p.flush(60) == 0, p.stats()
            stats = p.stats()
            assert p.close(5) == 0
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not warning_lines(caplog, logging.ERROR):
                time.sleep(0.2)
            q_stats = q.stats()
        finally:
            q_left = q.close(1)
    bootstrap = kafka_broker.bootstrap
    assert [w.split(" (")[0] for w in down_warnings] == [f"Kafka at {bootstrap} did not answer within 2 s"] * 2
    assert down_warnings[0].endswith(f"events are spooled to {tmp_path / 'spool'} and sent when it answers")
    assert during["topic_check_pending"] is True and during["spooled"] == 2000 and during["replayed"] == 0
    assert any(r.getMessage().startswith(f"Kafka at {bootstrap} answered after") for r in caplog.records)
    assert stats["topic_check_pending"] is False and stats["delivered"] == 2000 and stats["replayed"] == 2000
    assert stats["failed"] == 0 and stats["dropped"] == 0
    assert not list((tmp_path / "spool").glob("*.seg"))
    assert_exactly(consume_all(bootstrap, topic, 2000), events)
    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
    assert len(md.topics[topic].partitions) == 3  # created as asked, once Kafka answered
    # --no-create-topic, topic missing, found out only once Kafka answered:
    # an error line, and the events stay spooled (nothing is sent to a topic the broker might auto-create).
    errors = warning_lines(caplog, logging.ERROR)
    assert errors and errors[0].startswith(f"topic '{missing}' does not exist on {bootstrap} "
                                           "(and --no-create-topic was given)"), errors
    assert "2000 events wait in" in errors[0]
    assert q_stats["topic_check_pending"] is True and q_stats["delivered"] == 0 and q_left == 2000
    assert missing not in md.topics


def test_unresolvable_host_name_is_a_user_error(tmp_path):
    for bootstrap, name in [("no-such-host.invalid:9092", "no-such-host.invalid"),
                            ("127.0.0.1:9092,kafka-2.invalid:9092", "kafka-2.invalid")]:
        with pytest.raises(UserError, match=f"Kafka host '{name}' \\(--kafka\\) does not resolve"):
            KafkaPublisher.from_args(args_for(bootstrap, tmp_path), environ={}, connect_timeout=2)
    assert not (tmp_path / "spool").exists(), "bad input must fail before anything is touched"


def test_bootstrap_that_is_not_host_port_is_a_user_error(tmp_path):
    for bad in ["kafka", "kafka:", ":9092", "kafka:port", "kafka:0", "kafka:70000", "::1:9092",
                "127.0.0.1:9092,", "127.0.0.1:9092,,127.0.0.2:9092", "my kafka:9092"]:
        with pytest.raises(UserError, match="is not HOST:PORT"):
            KafkaPublisher.from_args(args_for(bad, tmp_path), environ={}, connect_timeout=2)
    assert not (tmp_path / "spool").exists()
    assert kafka.parse_bootstrap("a:1, [::1]:9092,SASL_SSL://kafka.example:9093") == \
        [("a", 1), ("::1", 9092), ("kafka.example", 9093)]


def test_unknown_topic_with_creation_disabled(kafka_broker, tmp_path):
    topic = new_topic()
    with pytest.raises(UserError, match=f"topic '{topic}' does not exist"):
        KafkaPublisher.from_args(args_for(kafka_broker.bootstrap, tmp_path, "--topic", topic, "--no-create-topic"),
                                 environ={})


def test_bad_properties_files(kafka_broker, tmp_path):
    missing = tmp_path / "nope.properties"
    with pytest.raises(UserError, match="cannot read Kafka properties file .*nope.properties"):
        KafkaPublisher.from_args(args_for(kafka_broker.bootstrap, tmp_path, "--kafka-config", str(missing)), environ={})
    bad = tmp_path / "bad.properties"
    bad.write_text("# comment\nsecurity.protocol=PLAINTEXT\nsasl.password hunter2\n")
    with pytest.raises(UserError) as err:
        KafkaPublisher.from_args(args_for(kafka_broker.bootstrap, tmp_path, "--kafka-config", str(bad)), environ={})
    assert "bad.properties:3: expected" in str(err.value) and "hunter2" not in str(err.value)
    unknown = tmp_path / "unknown.properties"
    unknown.write_text("no.such.property=1\n")
    with pytest.raises(UserError, match="bad Kafka configuration.*no.such.property"):
        KafkaPublisher.from_args(args_for(kafka_broker.bootstrap, tmp_path, "--kafka-config", str(unknown)), environ={})


def test_properties_from_file_and_env_and_secrets_never_logged(kafka_broker, tmp_path, caplog):
    conf = tmp_path / "kafka.properties"
    conf.write_text("client.id=fdpass-test\nssl.key.password=file-secret-42\n")
    env = {"FDPASS_KAFKA_SASL_PASSWORD": "env-secret-17", "FDPASS_KAFKA_SASL_USERNAME": "collector",
           "FDPASS_KAFKA_PORT": "9092", "PATH": "/usr/bin"}
    assert kafka.properties_from_env(env) == {"sasl.password": "env-secret-17", "sasl.username": "collector"}
    with caplog.at_level(logging.DEBUG):
        p = KafkaPublisher.from_args(args_for(kafka_broker.bootstrap, tmp_path, "--topic", new_topic(),
                                              "--kafka-config", str(conf)), environ=env)
        try:
            assert p.config["client.id"] == "fdpass-test" and p.config["sasl.password"] == "env-secret-17"
            p.publish(events_for(1)[0])
            assert p.flush(10) == 0
            # Should librdkafka ever echo a secret, the scrubber blanks it.
            kafka.LIBRDKAFKA_LOG.warning("auth failed for env-secret-17")
        finally:
            p.close(5)
    text = caplog.text
    assert "Kafka producer config" in text and "***" in text
    assert "env-secret-17" not in text and "file-secret-42" not in text
    assert "auth failed for ***" in text


def test_enforced_settings_cannot_be_weakened(kafka_broker, tmp_path):
    p = make_publisher(kafka_broker, new_topic(), tmp_path / "spool", config={"acks": "1", "linger.ms": 50})
    try:
        assert p.config["acks"] == "all" and p.config["enable.idempotence"] is True
        assert p.config["linger.ms"] == 50  # performance knobs stay the user's
    finally:
        p.close(5)


def test_spool_dir_used_by_another_publisher(kafka_broker, tmp_path):
    topic = new_topic()
    p = make_publisher(kafka_broker, topic, tmp_path / "spool")
    try:
        with pytest.raises(UserError, match="in use by another fdpass process"):
            make_publisher(kafka_broker, topic, tmp_path / "spool")
    finally:
        p.close(5)


def test_add_arguments_into_a_group_shows_in_help_without_warnings():
    import warnings

    parser = argparse.ArgumentParser()
    group = parser.add_argument_group("output (choose one)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nesting groups is deprecated and hides them from --help
        pub.add_arguments(group)
    assert "--kafka-config" in parser.format_help()
    args = parser.parse_args(["--kafka", "127.0.0.1:9092", "--no-create-topic", "--spool-max-bytes", "1000"])
    assert (args.topic, args.create_topic, args.spool_max_bytes, args.spool_dir) == \
        ("fdpass.events", False, 1000, "/var/lib/fdpass/spool")


def test_event_that_does_not_fit_the_schema_is_refused_before_publishing(kafka_broker, tmp_path):
    p = make_publisher(kafka_broker, new_topic(), tmp_path / "spool")
    try:
        bad = events_for(1)[0]
        del bad["host_id"]
        with pytest.raises(codec.EncodeError, match="host_id"):
            p.publish(bad)
        assert p.stats()["queued"] == 0 and p.stats()["spooled"] == 0
    finally:
        p.close(5)


def test_replaced_cluster_gets_everything_not_acknowledged_exactly_once(tmp_path, caplog):
    """The cluster at the collector's address is replaced by a new, empty one
    during an outage: the collector notices the new cluster id, rebuilds its
    producer, creates the topic there and delivers what the old cluster had
    not acknowledged and everything after, in order, exactly once; what the
    old cluster had acknowledged is not sent again."""
    import shutil

    from tests.fixtures_kafka import LocalKafka, free_port, fresh_data_dir

    port = free_port()
    dirs = [fresh_data_dir("replaced") for _ in range(2)]
    old, new = LocalKafka(dirs[0], port), LocalKafka(dirs[1], port)
    topic = new_topic()
    acked, during, later = events_for(300), events_for(200, 300), events_for(200, 500)
    old.start()
    try:
        p = make_publisher(old, topic, tmp_path / "spool", stall_seconds=2.0)
        try:
            for e in acked:
                p.publish(e)
            assert p.flush(30) == 0
            old.stop()
            for e in during:
                p.publish(e)
            new.start()  # a fresh cluster (new id, no topics) at the same address
            with caplog.at_level(logging.WARNING, logger="fdpass.publisher"):
                for e in later:
                    p.publish(e)
                left = p.flush(120)
            stats = p.stats()
        finally:
            p.close(5)
        assert left == 0 and stats["failed"] == 0 and stats["dropped"] == 0, stats
        assert any("is another cluster now" in r.getMessage() for r in caplog.records)
        assert_exactly(consume_all(new.bootstrap, topic, 400), during + later)
    finally:
        for broker in (old, new):
            if broker.is_running():
                broker.stop()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
