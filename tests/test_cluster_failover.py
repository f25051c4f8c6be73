"""A partition leader dies under a replicated topic: collector -> 3-broker cluster -> sink -> chDB.

The real publisher (collector/publisher.py) publishes synthetic events at a
steady rate into a topic of replication factor 3 (min.insync.replicas 2) on
a local 3-broker KRaft cluster; the real sink stores them into chDB. Mid-
stream the leader of the busiest partition is killed with SIGKILL (no
controlled shutdown, so the cluster has to notice and fail over), and later
restarted on its data while events keep coming. No mocks.

Run with -s to see the measured failover: the longest pause in delivery
(the publisher's acknowledged count) and in storage (the sink's stored rows),
each asserted under a bound derived from the settings in play (stall_bound,
storage_bound).
"""

from __future__ import annotations

import threading
import time

import pytest

from fdpass.collector.publisher import KafkaPublisher
from fdpass.schemas import synthetic
from fdpass.sinks.consumer import SinkConfig
from tests.fixtures_clickhouse import ThreadSink, committed_offsets, end_offsets, unique, wait_until

pytestmark = pytest.mark.kafka

PARTITIONS = 6
RATE = 2000  # events/s, a busy host
SECONDS = 40  # of publishing: the kill at 10 s, the failover, the restart, and events after it
KILL_AT = 10.0
HOSTS = 12
BATCH_AGE = 0.2  # the sink's batch age: storage progress is visible every 0.2 s

# librdkafka's own defaults; neither the publisher nor the sink changes them.
RETRY_BACKOFF_MAX_MS = 1000  # a request to a broker that is gone is retried within this
METADATA_FAST_REFRESH_MS = 100  # how often a client asks for metadata while a leader is unknown


def event(i: int) -> dict:
    # Half the events come from one host, so one partition (its key's) is clearly the busiest.
    host = 0 if i % 2 else 1 + i // 2 % (HOSTS - 1)
    return synthetic.make_event(i, host_id=f"{host:032x}", host=f"node-{host}")


def broker_settings(bootstrap: str, node: int) -> dict[str, int]:
    """The failover timings the live broker runs with (Kafka's defaults unless kafka-local set them)."""
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = AdminClient({"bootstrap.servers": bootstrap})
    res = ConfigResource(ConfigResource.Type.BROKER, str(node))
    cfg = admin.describe_configs([res])[res].result(30)
    names = ("broker.session.timeout.ms", "controller.quorum.fetch.timeout.ms",
             "controller.quorum.election.timeout.ms", "controller.quorum.election.backoff.max.ms")
    return {n: int(cfg[n].value) for n in names}


def stall_bound(settings: dict[str, int]) -> tuple[float, str]:
    """How long delivery may pause when one broker dies, from the settings in play.

    Nobody tells the cluster that a SIGKILLed broker is gone: the controller
    fences it when its heartbeats have been missing for broker.session.timeout.ms,
    and only then elects new leaders for its partitions and drops it from every
    ISR (until then acks=all writes wait for it on *every* partition). If the
    dead broker was also the active controller, the others first notice that
    (controller.quorum.fetch.timeout.ms), elect a new one (election timeout,
    plus a random backoff up to its max) and the new one starts the session
    clock afresh. The clients then find the new leaders (a retry backoff and a
    metadata refresh).
    """
    terms = {
        "controller election": (settings["controller.quorum.fetch.timeout.ms"]
                                + settings["controller.quorum.election.timeout.ms"]
                                + settings["controller.quorum.election.backoff.max.ms"]) / 1000,
        "broker session timeout": settings["broker.session.timeout.ms"] / 1000,
        "client retry + metadata refresh": (RETRY_BACKOFF_MAX_MS + METADATA_FAST_REFRESH_MS) / 1000,
    }
    return sum(terms.values()), " + ".join(f"{v:.1f} s {k}" for k, v in terms.items())


def storage_bound(delivery_bound: float, sink_session_ms: int) -> tuple[float, str]:
    """How long storage may pause: delivery's failover, then the sink's own group.

    Until the dead broker is fenced, writes to __consumer_offsets wait for it
    too, so the sink's commits and group requests hang; when that outlasts the
    consumer's session.timeout.ms, librdkafka gives the partitions up ("lost")
    and rejoins, and the coordinator completes that rebalance only once the old
    member's session has expired as well. Then the sink re-forms its recorded
    batches and cuts the next within its batch age (a second allowed for the
    insert and the commit).
    """
    terms = {"delivery failover": delivery_bound, "sink session timeout": sink_session_ms / 1000,
             "sink batch age + insert": BATCH_AGE + 1.0}
    return sum(terms.values()), " + ".join(f"{v:.1f} s {k}" for k, v in terms.items())


def every_offset_committed(bootstrap: str, group: str, topic: str) -> bool:
    # A partition no key hashed to has nothing to commit.
    ends = end_offsets(bootstrap, topic, PARTITIONS)
    committed = committed_offsets(bootstrap, group, topic, PARTITIONS)
    return all(committed[p] == end for p, end in ends.items() if end > 0)


class Progress:
    """Samples a counter every 20 ms; `gaps` are the pauses between its increases."""

    def __init__(self, read):
        self.read = read
        self.times: list[float] = []  # when the counter was seen to increase
        self.last = 0

    def sample(self, now: float) -> None:
        value = self.read()
        if value > self.last:
            self.times.append(now)
            self.last = value

    def gaps(self) -> list[tuple[float, float]]:
        """(start, length) of every pause, longest first."""
        return sorted(((a, b - a) for a, b in zip(self.times, self.times[1:])), key=lambda g: -g[1])

    def resumed(self, t: float) -> float:
        """Seconds from t until the longest pause that began within 2 s of t ended (the failover after a kill at t)."""
        return next((start + length - t for start, length in self.gaps() if t - 2 <= start <= t + 2), 0.0)

    def gap_at(self, t: float) -> float:
        """The pause under way at time t (or starting within 1 s after it)."""
        return max((length for start, length in self.gaps() if start - 1.0 <= t <= start + length), default=0.0)


def test_leader_killed_mid_stream_every_event_stored_once(kafka_cluster, open_store, tmp_path, request):
    bootstrap = kafka_cluster.bootstrap
    topic, group = unique("t-failover"), unique("g-failover")
    n = RATE * SECONDS
    publisher = KafkaPublisher(bootstrap, topic, spool_dir=str(tmp_path / "spool"), partitions=PARTITIONS,
                               replication=3, connect_timeout=30)
    # Also when an assertion fails: a producer left running would keep logging its retries to this
    # cluster's ports into the tests after it (close() is idempotent).
    request.addfinalizer(lambda: publisher.close(timeout=1))

    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = AdminClient({"bootstrap.servers": bootstrap})
    # Created on one broker; the others learn of it from the metadata log a moment later.
    parts = wait_until(lambda: admin.list_topics(topic, timeout=30).topics[topic].partitions, 30,
                       "the topic in every broker's metadata")
    assert len(parts) == PARTITIONS and all(len(p.replicas) == 3 for p in parts.values())
    res = ConfigResource(ConfigResource.Type.TOPIC, topic)

    def topic_config():  # the broker asked may not have the topic yet: UNKNOWN_TOPIC_OR_PART until it has
        try:
            return admin.describe_configs([res])[res].result(30)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise
            return None

    assert wait_until(topic_config, 30, "the topic's config")["min.insync.replicas"].value == "2"

    store = open_store()
    sink = ThreadSink(store, SinkConfig(bootstrap=bootstrap, topic=topic, group=group, batch_rows=5000,
                                        batch_age=BATCH_AGE)).start()
    request.addfinalizer(sink.stop)
    wait_until(lambda: len(sink.sink.buffers) == PARTITIONS, 60, "the sink's assignment")

    delivered = Progress(lambda: publisher.stats()["delivered"])
    stored = Progress(lambda: sink.sink.stats["rows"])
    done = threading.Event()
    errors: list[BaseException] = []

    def publish():  # RATE events/s in 10 ms slices, as the collector would hand them over
        try:
            start = time.monotonic()
            for i in range(n):
                if i % (RATE // 100) == 0:
                    time.sleep(max(0.0, start + i / RATE - time.monotonic()))
                publisher.publish(event(i))
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)

    def watch():
        while not done.is_set():
            now = time.monotonic()
            if delivered.last < n:  # then close() has the producer to itself
                delivered.sample(now)
            stored.sample(now)
            time.sleep(0.02)

    feeder = threading.Thread(target=publish, name="publish")
    watcher = threading.Thread(target=watch, name="watch", daemon=True)
    t0 = time.monotonic()
    feeder.start()
    watcher.start()
    time.sleep(KILL_AT)
    assert delivered.times and stored.times, "nothing delivered and stored before the kill"

    # The busiest partition is the one with the most messages so far; kill its leader.
    ends = end_offsets(bootstrap, topic, PARTITIONS)
    busiest = max(ends, key=ends.get)
    victim = admin.list_topics(topic, timeout=30).topics[topic].partitions[busiest].leader
    coordinator = admin.describe_consumer_groups([group])[group].result(30).coordinator.id
    bound, terms = stall_bound(broker_settings(bootstrap, next(k for k in kafka_cluster.ports if k != victim)))
    s_bound, s_terms = storage_bound(bound, sink.sink._kafka_conf()["session.timeout.ms"])
    killed_at = kafka_cluster.kill9(victim)
    # Back once the cluster has failed over (a new leader) and delivery has moved on since, plus a few seconds.
    wait_until(lambda: admin.list_topics(topic, timeout=5).topics[topic].partitions[busiest].leader not in (-1, victim),
               bound + 30, "a new leader of the busiest partition", interval=0.1)
    elected_at = time.monotonic()
    wait_until(lambda: delivered.times[-1] > elected_at, 30, "delivery to resume", interval=0.1)
    time.sleep(3)
    restart_at = time.monotonic()
    assert restart_at - t0 < SECONDS - 5, "the failover took the whole stream: no events left to cross the restart"
    kafka_cluster.start_node(victim)
    restarted_at = time.monotonic()
    feeder.join(SECONDS + 120)
    assert not feeder.is_alive() and not errors, errors

    wait_until(lambda: delivered.last == n, 120, "every event acknowledged", interval=0.1)
    assert publisher.close(timeout=60) == 0
    stats = publisher.stats()
    assert (stats["delivered"], stats["failed"], stats["dropped"]) == (n, 0, 0), stats
    wait_until(lambda: every_offset_committed(bootstrap, group, topic), 120, "every offset committed", interval=0.5)
    lost = len(sink.sink.assigned_history) - 1  # every re-assignment followed a loss: one sink, nothing else joins
    assert sink.stop() == 0
    done.set()
    watcher.join()

    c = store.client()
    assert c.query("SELECT count(), uniqExact(event_id) FROM fdpass.events").result_rows == [(n, n)]

    # delivered.times / stored.times end once everything is in: every pause in them is one with work waiting.
    d_gap, s_gap = delivered.gaps()[0], stored.gaps()[0]
    print(f"\nkilled broker {victim} (leader of partition {busiest}, {ends[busiest]} of {sum(ends.values())} "
          f"messages; the sink group's coordinator: broker {coordinator}) at {killed_at - t0:.1f} s; "
          f"restarted it at {restart_at - t0:.1f} s (back after {restarted_at - restart_at:.1f} s)")
    print(f"failover (from the kill until progress resumed): delivery {delivered.resumed(killed_at):.2f} s, "
          f"storage {stored.resumed(killed_at):.2f} s")
    print(f"around the restart: delivery paused {delivered.gap_at(restart_at):.2f} s, "
          f"storage {stored.gap_at(restart_at):.2f} s")
    print(f"longest pauses: delivery {d_gap[1]:.2f} s at {d_gap[0] - t0:.1f} s (bound {bound:.1f} s = {terms}); "
          f"storage {s_gap[1]:.2f} s at {s_gap[0] - t0:.1f} s (bound {s_bound:.1f} s = {s_terms})")
    print(f"publisher: {stats}; sink: {sink.sink.stats}, partitions lost {lost} times")
    assert d_gap[1] < bound, f"delivery paused {d_gap[1]:.1f} s, more than {bound:.1f} s ({terms})"
    assert s_gap[1] < s_bound, f"storage paused {s_gap[1]:.1f} s, more than {s_bound:.1f} s ({s_terms})"
