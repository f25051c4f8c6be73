"""Publishing events to Kafka without losing them when Kafka is away.

    publisher = KafkaPublisher.from_args(args)     # after add_arguments(parser)
    publisher.publish(event)                       # or publish_encoded(key, value)
    ...
    undelivered = publisher.close(timeout=10)      # flush; the rest stays in the spool

Where an event can be, in order:
1. librdkafka's queue (idempotent producer, acks=all, retried forever:
   message.timeout.ms=0, so a long outage never fails a queued event and the
   per-partition order is the order of publish()). Bounded by
   `queue_max_messages`.
2. the on-disk spool (collector/spool.py), when the queue is full or Kafka
   has not acknowledged anything for `stall_seconds` while events wait.
   Once anything is in the spool, every new event goes behind it until the
   spool has drained, so the order per host (= per key = per partition) is
   the order of publish(). A background thread serves delivery reports and
   moves spooled events back into the producer once Kafka takes events again,
   one segment file at a time: a segment is settled (its file deleted) once
   the producer's queue has emptied after its last record was handed over,
   and the next segment starts only then.
3. close(): what the producer still holds after the flush timeout is purged
   from it and written at the front of the spool; the next publisher on the
   same spool directory replays it first (also after a process restart).

A replaced cluster: the producer's connections refuse a cluster other than
the one they first met (librdkafka: "reports different ClusterId"), so it
would never deliver again. While deliveries stall, a watcher asks the
address for its cluster id and the topic every CLUSTER_CHECK_EVERY s with a
fresh admin client; on a new id or a missing topic it rebuilds the producer,
puts everything unacknowledged back at the front of the spool (in order) and
lets the topic check create the topic(s) and the spool drain (_rebuild).
Messages librdkafka refuses for a missing topic go back to the spool too.

Start-up: bad input is a one-line UserError before anything runs: a --kafka
entry that is not HOST:PORT, a host name that does not resolve, an unreadable
or bad properties file, bad librdkafka properties, and a topic that does not
exist with --no-create-topic when the broker answered. Kafka not answering
within `connect_timeout` (an outage: the address resolves, nobody answers) is
not an error: one WARNING line names the address and the spool directory, the
publisher runs and spools every event, and a background thread retries the
topic check (and creation) until the broker answers, warning every 30 s
meanwhile; only then does the spool start draining to Kafka, in order. A
collector (re)started while Kafka is down therefore starts recording after
that one bounded wait (10 s from the command line) instead of exiting, and
loses nothing it records.

Delivery reports: librdkafka reports every message, but only failures reach
Python (delivery.report.only.error; confluent-kafka skips the Python call for
successes, which would cost ~1.9 us per event, as much as produce() itself).
What was delivered is counted, not reported: handed to the producer, minus
what it still holds, minus failures and purges.

Delivery is at-least-once: a crash can replay spooled events Kafka already
had, and events purged at close while in flight may have reached the broker.
Consumers drop duplicates by event_id (deterministic per event).

Full spool: the newest event is dropped, counted in stats()["dropped"] and
logged (each drop; past 10 per second the rest of that second is summed up
in one line, so a long outage cannot flood the log).

Security: librdkafka properties come from --kafka-config FILE (key=value
lines) and FDPASS_KAFKA_<PROP> environment variables (FDPASS_KAFKA_SASL_PASSWORD
-> sasl.password), never from argv. Values of secret properties are masked
in every log line and error message this module writes.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time

from confluent_kafka import KafkaError, KafkaException, Producer

from fdpass import defaults, kafka
from fdpass.kafka import SCRUBBER as _SCRUBBER, TopicProblem as _TopicProblem, is_secret, mask
from fdpass.collector.spool import Spool, SpoolLocked
from fdpass.errors import UserError
from fdpass.schemas import codec
from fdpass.schemas.codec import encode_unchecked as _encode_unchecked

log = logging.getLogger("fdpass.publisher")

DEFAULT_TOPIC = defaults.TOPIC
DEFAULT_SPOOL_DIR = defaults.SPOOL_DIR
DEFAULT_SPOOL_MAX_BYTES = 1 << 30

# Chosen with bench/bench_publish.py --sweep (one core, 2-core VM, local
# broker): 20 ms linger with 1 MB batches gave the best publish rates (runs
# swing +-30%; linger 0-5 ms and 256 kB batches were 20-40% slower), and lz4
# costs the producer's core least among the codecs (zstd and snappy were
# within noise of it). 20 ms of added latency is nothing for a forensic log.
PERFORMANCE_DEFAULTS = {
    "linger.ms": 20,
    "batch.size": 1 << 20,
    "compression.type": "lz4",
}
# Not overridable: what "loses nothing, keeps order" rests on, and what the
# delivery accounting rests on (only failures are reported one by one).
REQUIRED = {
    "enable.idempotence": True,
    "acks": "all",
    "message.timeout.ms": 0,  # never expire a queued event; the spool bounds memory instead
    "delivery.report.only.error": True,
}

POLL_EVERY = 1000  # publishes between inline polls of delivery reports
# Kafka unreachable at start: how often the background topic check warns that
# it still is, and how long each of its metadata requests waits.
START_WARN_EVERY = 30.0  # s
START_RETRY_TIMEOUT = 2.0  # s
# While deliveries are stalled, how often the cluster is asked whether it is
# still the one the producer talks to (a fresh admin client each time).
CLUSTER_CHECK_EVERY = 5.0  # s
_TRANSIENT = kafka.transient_codes()
# Delivery errors after which a message goes back to the spool instead of counting as failed.
_TAKE_BACK = {KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT, KafkaError._UNKNOWN_TOPIC,
              KafkaError.UNKNOWN_TOPIC_OR_PART}
SERVE_INTERVAL = 0.05  # s; the background thread's period

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Kafka options of `fdpass collect`, on a parser (in a "Kafka" group) or an argument group."""
    # argparse hides (and deprecates) groups nested in groups: add straight
    # into a group we are given.
    g = parser.add_argument_group("Kafka") if isinstance(parser, argparse.ArgumentParser) else parser
    g.add_argument("--kafka", metavar="HOST:PORT[,HOST:PORT]",
                   help="publish Avro events to these Kafka bootstrap servers. An entry that is not HOST:PORT "
                        "or a host name that does not resolve stops fdpass at start; Kafka down at start does "
                        "not: after a 10 s wait fdpass warns, records anyway, spools events to --spool-dir "
                        "and sends them, in order, once Kafka answers")
    g.add_argument("--topic", default=DEFAULT_TOPIC, help="topic (default %(default)s)")
    g.add_argument("--kafka-config", metavar="FILE",
                   help="librdkafka properties, key=value lines (SASL, TLS...); also FDPASS_KAFKA_<PROP> "
                        "environment variables, e.g. FDPASS_KAFKA_SASL_PASSWORD. Never put secrets on the command line")
    g.add_argument("--spool-dir", default=DEFAULT_SPOOL_DIR,
                   help="where events wait on disk while Kafka is unreachable, also when it is down at "
                        "start (default %(default)s)")
    g.add_argument("--spool-max-bytes", type=int, default=DEFAULT_SPOOL_MAX_BYTES,
                   help="spool size bound; past it the newest events are dropped and counted (default 1 GiB)")
    g.add_argument("--partitions", type=int, default=6,
                   help="partitions when the topic has to be created (default %(default)s)")
    g.add_argument("--replication", type=int, default=1,
                   help="replication factor when the topic has to be created (default %(default)s)")
    g.add_argument("--no-create-topic", dest="create_topic", action="store_false",
                   help="fail if the topic does not exist instead of creating it (Kafka down at start: "
                        "events stay spooled, with an error logged, until the topic exists)")


class KafkaPublisher:
    """Publishes events (Avro single-object encoded, key = host_id) to one topic.

    publish()/publish_encoded() are meant to be called from one thread.

    The constructor raises UserError (one line) for bad input. When Kafka does
    not answer within `connect_timeout` s it logs one warning and returns a
    publisher that spools every event until Kafka answers and the topic is
    checked (created if needed) in the background; see the module docstring.
    """

    def __init__(self, bootstrap: str, topic: str = DEFAULT_TOPIC, *, config: dict | None = None,
                 spool_dir: str = DEFAULT_SPOOL_DIR, spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES,
                 spool_segment_bytes: int = 16 << 20, partitions: int = 6, replication: int = 1,
                 create_topic: bool = True, connect_timeout: float = 10.0,
                 queue_max_messages: int = 100_000, stall_seconds: float = 5.0):
        self.topic = topic
        self.bootstrap = bootstrap
        self.queue_max_messages = queue_max_messages
        self.stall_seconds = stall_seconds
        # Bad input first, before anything touches the disk or the network.
        servers = kafka.parse_bootstrap(bootstrap)
        if create_topic and (partitions < 1 or replication < 1):
            raise UserError(f"--partitions and --replication must be >= 1 (got {partitions}, {replication})")
        kafka.check_resolvable(servers)
        self._partitions, self._replication, self._create_topic = partitions, replication, create_topic
        user = dict(config or {})
        for key, value in REQUIRED.items():
            if key in user and str(user[key]).lower() != str(value).lower():
                log.warning("Kafka property %s=%s ignored: fdpass needs %s=%s (no loss, order, delivery counts)",
                            key, "***" if is_secret(key) else user[key], key, value)
        self.config = {**PERFORMANCE_DEFAULTS, **user, **REQUIRED,
                       "bootstrap.servers": bootstrap,
                       "queue.buffering.max.messages": queue_max_messages,
                       "statistics.interval.ms": 5000}
        kafka.remember_secrets(self.config)
        log.info("Kafka producer config: %s", mask(self.config))
        # The spool first: it is local and cheap to check, and holding its
        # lock keeps a second collector on the same directory from starting.
        try:
            self._spool = Spool(spool_dir, max_bytes=spool_max_bytes, segment_bytes=spool_segment_bytes)
        except (SpoolLocked, OSError) as exc:
            raise UserError(str(exc)) from None
        # False until Kafka has answered and the topic exists: until then
        # every event goes to the spool and nothing is replayed.
        self._topic_ready = False
        self._admin_error = ""  # librdkafka's last word on why Kafka does not answer
        self._stop = threading.Event()
        self._producer = None
        try:
            # Both clients before waiting on the network: a bad property is
            # bad input and must not wait for (or be hidden by) an outage.
            admin = self._new_admin()
            self._producer = self._new_producer()
            self._produce = self._producer.produce  # bound once: publish() calls it per event
            self._cluster_id: str | None = None  # the cluster the producer delivers to (set by the topic check)
            self._retired: list = []  # producers of a replaced cluster, purged again at close
            self._topic_ready = self._check_topic(admin, connect_timeout)
        except BaseException:
            self._producer = None
            self._spool.close()
            raise
        # What was delivered is counted, not reported (see the module doc):
        # _produced - len(producer) - failed - purged, kept by _count_delivered.
        self._produced = 0  # messages the producer accepted (direct and replayed)
        self._purged_count = 0  # messages purged at close: direct ones (kept in _purged) and replayed ones
        self.delivered = 0
        self.failed = 0
        self.retried = 0
        self.dropped = 0
        self.spooled = 0  # events that went through the spool
        self.replayed = 0  # spooled events handed back to the producer
        # Guards the spool. Re-entrant so that a delivery callback served
        # inside a producer call made under the lock cannot deadlock.
        self._lock = threading.RLock()
        others = self._spool.topics - {topic}
        if others:
            log.warning("the spool in %s holds events of an earlier run for topic(s) %s: they are replayed "
                        "there, not to %s", spool_dir, ", ".join(sorted(others)), topic)
        if self._spool.untopical:
            log.warning("the spool in %s holds %d events in spool format 1 (an fdpass that did not keep the "
                        "topic): they are replayed to %s", spool_dir, self._spool.untopical, topic)
        # Events from an earlier run go first; with Kafka not answering yet, all events wait in the spool.
        self._spooling = self._spool.has_unread() or not self._topic_ready
        self._held = None  # a spool record the producer refused (queue full): retried first
        # Replayed records not yet settled, as [segment, count] in replay order;
        # settled together once the producer's queue is empty (see _replay).
        self._in_flight: list[list] = []
        self._last_progress = time.monotonic()
        self._delivered_at_tick = 0
        self._closed = False
        self._drop_window = (0, 0)  # (second, drops logged in it)
        self._drops_unlogged = 0
        self._purged: list[tuple[bytes, bytes, str]] = []
        self._undelivered_at_close = 0
        self._poll_lock = threading.Lock()  # one thread serves librdkafka callbacks at a time
        self._next_poll = POLL_EVERY  # _produced at which publish() next polls inline
        self._last_inline_poll = 0.0
        self._keys: dict[str, bytes] = {}  # host_id -> key bytes (a collector sees one or few)
        self._thread = threading.Thread(target=self._serve, name="fdpass-kafka", daemon=True)
        self._thread.start()
        self._topic_thread = None
        if not self._topic_ready:
            self._start_topic_thread(admin, time.monotonic() - connect_timeout)
        self._cluster_thread = threading.Thread(target=self._watch_cluster, name="fdpass-kafka-cluster", daemon=True)
        self._cluster_thread.start()

    def _new_producer(self):
        try:
            return Producer({**self.config, "logger": _ProducerLog(self), "error_cb": self._on_error,
                             "on_delivery": self._on_delivery, "stats_cb": self._on_stats})
        except KafkaException as exc:
            raise UserError(_SCRUBBER.scrub(f"bad Kafka configuration: {exc.args[0].str()}")) from None

    def _start_topic_thread(self, admin, since: float) -> None:
        self._topic_thread = threading.Thread(target=self._await_topic, args=(admin, since),
                                              name="fdpass-kafka-topic", daemon=True)
        self._topic_thread.start()

    # --- construction from the command line ------------------------------------
    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: dict | None = None,
                  connect_timeout: float = 10.0) -> KafkaPublisher:
        """The publisher `fdpass collect` asked for; UserError (one line) for bad input.

        Kafka not answering within `connect_timeout` s is not bad input: the
        publisher warns once and runs, spooling, until Kafka answers.
        """
        if not args.kafka:
            raise UserError("--kafka HOST:PORT is required to publish to Kafka")
        config = {}
        if args.kafka_config:
            config.update(kafka.read_properties_file(args.kafka_config))
        config.update(kafka.properties_from_env(environ))
        if args.spool_max_bytes <= 0:
            raise UserError(f"--spool-max-bytes must be positive, got {args.spool_max_bytes}")
        return cls(args.kafka, args.topic, config=config, spool_dir=args.spool_dir,
                   spool_max_bytes=args.spool_max_bytes, partitions=args.partitions,
                   replication=args.replication, create_topic=getattr(args, "create_topic", True),
                   connect_timeout=connect_timeout)

    # --- the topic check: at start, and in the background while Kafka is down ----
    def _new_admin(self):
        return kafka.admin_client(self.config, error_cb=self._on_admin_error)

    def _on_admin_error(self, err) -> None:
        # "Connect to ipv4#10.0.0.7:9092 failed: Connection refused" says more than "1/1 brokers are down".
        if err.code() != KafkaError._ALL_BROKERS_DOWN or not self._admin_error:
            self._admin_error = kafka.short_reason(_SCRUBBER.scrub(err.str()))

    def _metadata(self, admin, timeout: float):
        """Cluster metadata, or None when Kafka did not answer within `timeout` s."""
        try:
            return admin.list_topics(timeout=timeout)
        except KafkaException as exc:
            if not self._admin_error:
                self._admin_error = _SCRUBBER.scrub(exc.args[0].str())
            return None
        finally:
            admin.poll(0)  # serves error_cb: the reason Kafka does not answer

    def _check_topic(self, admin, timeout: float) -> bool:
        """At start: True once the topic is there (created if missing and allowed).

        UserError for bad input (a missing topic with --no-create-topic, a
        topic Kafka refuses to create); False, after one warning, when Kafka
        did not answer within `timeout` s: the caller spools and retries.
        """
        md = self._metadata(admin, timeout)
        if md is not None:
            try:
                self._ensure_topic(admin, md, timeout)
                self._cluster_id = md.cluster_id
                return True
            except _TopicProblem as exc:
                if not exc.transient:
                    raise UserError(str(exc)) from None
                self._admin_error = str(exc)
        log.warning("Kafka at %s did not answer within %.0f s (%s); events are spooled to %s and sent "
                    "when it answers", self.bootstrap, timeout, self._admin_error or "no reason given",
                    self._spool.dir)
        return False

    def _ensure_topic(self, admin, md, timeout: float) -> None:
        """The topic exists when this returns, and so does every other topic
        the spool holds events for (an earlier run's --topic); _TopicProblem otherwise."""
        for topic in [self.topic, *sorted(self._spool.topics - {self.topic})]:
            kafka.ensure_topic(admin, md, topic, self._partitions, self._replication, timeout,
                               self.bootstrap, create=self._create_topic)

    def _await_topic(self, admin, since: float) -> None:
        """Background, while Kafka has not answered since start: retry the topic
        check until it passes, then let the spool drain (see _tick)."""
        next_warn = time.monotonic() + START_WARN_EVERY
        said = ""
        while not self._stop.is_set():
            md = self._metadata(admin, START_RETRY_TIMEOUT)
            problem = None
            if md is not None:
                try:
                    self._ensure_topic(admin, md, 5.0)
                except _TopicProblem as exc:
                    problem = exc
                else:
                    with self._lock:
                        waiting = self._spool.pending
                    self._cluster_id = md.cluster_id
                    self._topic_ready = True
                    log.warning("Kafka at %s answered after %.0f s: sending the %d events spooled to %s",
                                self.bootstrap, time.monotonic() - since, waiting, self._spool.dir)
                    return
            now = time.monotonic()
            text = str(problem) if problem is not None else ""
            if now >= next_warn or (problem is not None and not problem.transient and text != said):
                next_warn = now + START_WARN_EVERY
                said = text
                with self._lock:
                    waiting = self._spool.pending
                if problem is not None and not problem.transient:
                    # Bad input found late (Kafka was down at start): say so
                    # loudly, keep everything, and look again.
                    log.error("%s; meanwhile %d events wait in %s", problem, waiting, self._spool.dir)
                else:
                    log.warning("Kafka at %s has still not answered after %.0f s (%s); %d events wait in %s",
                                self.bootstrap, now - since, text or self._admin_error or "no reason given",
                                waiting, self._spool.dir)
            self._stop.wait(0.5 if problem is None else 5.0)

    # --- the cluster watch: a replaced cluster or a deleted topic -----------------
    def _watch_cluster(self) -> None:
        """Background: while deliveries are stalled, ask the cluster at the
        bootstrap address (with a fresh admin client: the producer's own
        connections refuse a cluster other than the one they first met) for
        its id and the topic. A new cluster id (a rebuilt cluster, a failover
        to a standby) or a missing topic means the producer will never
        deliver again: rebuild it (see _rebuild)."""
        while not self._stop.wait(CLUSTER_CHECK_EVERY):
            if not self._topic_ready or time.monotonic() - self._last_progress <= self.stall_seconds:
                continue
            try:
                admin = kafka.admin_client(self.config)
            except UserError:
                continue
            md = self._metadata(admin, START_RETRY_TIMEOUT)
            if md is None or self._stop.is_set():
                continue
            topic = md.topics.get(self.topic)
            if self._cluster_id and md.cluster_id and md.cluster_id != self._cluster_id:
                self._rebuild(admin, f"Kafka at {self.bootstrap} is another cluster now (cluster id "
                                     f"{self._cluster_id} -> {md.cluster_id})")
            elif topic is None or (topic.error is not None and topic.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
                # Only a missing topic: an election in progress also shows as a (transient) topic error.
                self._rebuild(admin, f"topic {self.topic} is gone from Kafka at {self.bootstrap}")

    def _rebuild(self, admin, why: str) -> None:
        """Start over with a new producer: everything the old one had not had
        acknowledged goes back to the front of the spool, in order (the events
        it still queued, then any replayed segment it was sending); the topic
        check creates the topic(s) on the cluster now there and the spool
        drains into it. What the old cluster acknowledged is not sent again."""
        with self._poll_lock:
            with self._lock:
                self._spooling = True  # from now on publish() spools
                self._topic_ready = False
            old = self._producer
            self._producer = self._new_producer()
            self._produce = self._producer.produce
            self._retired.append(old)
            purged = self._take_back(old)
            with self._lock:
                rewound = sum(self._spool.rewind(seg) for seg, _count in self._in_flight)
                self._in_flight, self._held = [], None
                self._store_taken_back()
            self._last_progress = time.monotonic()
        log.warning("%s: rebuilding the Kafka producer; the %d events it had not delivered and %d spooled "
                    "events being replayed are sent again, in order, after the topic check", why, purged, rewound)
        self._start_topic_thread(admin, time.monotonic())

    def _take_back(self, producer) -> int:
        """Purge a producer: every message it holds is reported purged
        (_on_delivery keeps direct ones in _purged; replayed ones stay in their
        spool segment). Returns how many direct ones came back."""
        before = len(self._purged)
        producer.purge(in_queue=True, in_flight=True, blocking=True)
        producer.poll(0)
        producer.flush(0)
        return len(self._purged) - before

    def _store_taken_back(self) -> None:
        """Put the purged events in front of the spool (they are older than anything in it); what
        does not fit is dropped and counted. Called with _lock held."""
        kept = self._spool.prepend(self._purged)
        for key, value, _topic in self._purged[kept:]:
            self._drop(key, len(value))
        self._purged = []

    # --- publishing -------------------------------------------------------------
    def publish(self, event: dict) -> None:
        """Encode and publish one event; key = its host_id (per-host order).

        Raises codec.EncodeError (a ValueError) if the event does not fit the schema.
        """
        # The collector's hot path: every line here costs a measurable share
        # of the ~5 us an event may take (bench/bench_publish.py).
        try:
            value = _encode_unchecked(event)  # first: it checks host_id is there and a string
        except Exception:
            value = codec.encode(event)  # raises the EncodeError that names the reason
        key = self._keys.get(event["host_id"]) or self._new_key(event["host_id"])
        # publish_encoded(key, value), inlined: one Python call less per event.
        if self._closed:
            raise RuntimeError("publish after close()")
        if not self._spooling:
            try:
                self._produce(self.topic, value, key)
            except BufferError:
                pass  # queue bound reached: this event and all after it go to the spool
            else:
                self._produced += 1
                if self._produced >= self._next_poll:
                    self._poll_inline()
                return
        with self._lock:
            self._spooling = True
            self._to_spool(key, value)

    def _new_key(self, host_id: str) -> bytes:
        if len(self._keys) > 1024:  # a relay of many hosts: keep the memo bounded
            self._keys.clear()
        key = self._keys[host_id] = host_id.encode()
        return key

    def publish_encoded(self, key: bytes, value: bytes) -> None:
        if self._closed:
            raise RuntimeError("publish after close()")
        if not self._spooling:
            try:
                self._produce(self.topic, value, key)
            except BufferError:
                pass  # queue bound reached: this event and all after it go to the spool
            else:
                self._produced += 1
                if self._produced >= self._next_poll:
                    self._poll_inline()
                return
        with self._lock:
            self._spooling = True
            self._to_spool(key, value)

    def publish_encoded_many(self, key: bytes, values: list[bytes]) -> None:
        """publish_encoded(key, value) for each value, in order: the capture
        path hands its messages over a ring buffer batch at a time."""
        if self._closed:
            raise RuntimeError("publish after close()")
        produce, topic = self._produce, self.topic
        sent = 0
        for value in values:
            if self._spooling:
                break
            try:
                produce(topic, value, key)
            except BufferError:
                break  # queue bound reached: this event and all after it go to the spool
            sent += 1
            self._produced += 1
            if self._produced >= self._next_poll:
                self._poll_inline()
        if sent == len(values):
            return
        with self._lock:
            self._spooling = True
            for value in values[sent:]:
                self._to_spool(key, value)

    def _poll_inline(self) -> None:
        # While events flow, the publishing thread serves delivery reports
        # itself, a thousand at a time: far cheaper than handing the GIL to
        # the background thread for each batch (measured on one core: 52k ->
        # 72k events/s before the codec got faster).
        self._next_poll = self._produced + POLL_EVERY
        if self._poll_lock.acquire(blocking=False):
            try:
                self._producer.poll(0)
                self._tick()
                self._last_inline_poll = time.monotonic()
            finally:
                self._poll_lock.release()

    def _to_spool(self, key: bytes, value: bytes) -> None:
        if self._spool.append(key, value, self.topic):
            self.spooled += 1
        else:
            self._drop(key, len(value))

    def _drop(self, key: bytes, size: int) -> None:
        self.dropped += 1
        second = int(time.monotonic())
        window, logged = self._drop_window
        if second != window:
            if self._drops_unlogged:
                log.warning("%s: %d more events dropped in the previous second (total dropped %d)",
                            self._spool.refused or "spool full", self._drops_unlogged, self.dropped)
                self._drops_unlogged = 0
            window, logged = second, 0
        if logged < 10:
            log.warning("%s: dropped the newest event (key %s, %d bytes); total dropped %d",
                        self._spool.refused or "spool full", key.decode(errors="replace"), size, self.dropped)
            logged += 1
        else:
            self._drops_unlogged += 1
        self._drop_window = (window, logged)

    # --- the background thread: delivery reports, stall detection, replay --------
    def _serve(self) -> None:
        # Serves delivery reports, stall detection and replay whenever the
        # publishing thread has not done so lately (idle collector, outage,
        # flush). One poller at a time (_poll_lock): callbacks update plain
        # counters.
        while not self._stop.wait(SERVE_INTERVAL / 5 if self._spooling else SERVE_INTERVAL):
            # While the spool drains, tick faster: each tick replays at most
            # what fits in half of the producer's queue.
            if time.monotonic() - self._last_inline_poll < SERVE_INTERVAL / 5:
                continue
            with self._poll_lock:
                self._producer.poll(0)
                self._tick()

    def _count_delivered(self, waiting: int) -> None:
        # Called with _poll_lock held, right after a poll: the failure and
        # purge counts are then up to date with `waiting`. A publish() between
        # its produce() and `_produced += 1` makes this one too low for an
        # instant; max() keeps the count from ever going down (it is a
        # Prometheus counter).
        delivered = self._produced - waiting - self.failed - self._purged_count
        if delivered > self.delivered:
            self.delivered = delivered

    def _tick(self) -> None:
        if self._purged and not self._closed:  # refused for a missing topic (see _on_delivery)
            with self._lock:
                self._spooling = True
                self._store_taken_back()
        now = time.monotonic()
        waiting = len(self._producer)
        self._count_delivered(waiting)
        if waiting == 0 or self.delivered != self._delivered_at_tick:
            self._last_progress = now
            self._delivered_at_tick = self.delivered
        stalled = now - self._last_progress > self.stall_seconds
        if stalled and not self._spooling:
            with self._lock:
                if not self._spooling:
                    log.warning("Kafka at %s has acknowledged nothing for %.0f s with %d events waiting: "
                                "spooling new events to %s", self.bootstrap, now - self._last_progress,
                                waiting, self._spool.dir)
                    self._spooling = True
        if self._spooling and not stalled and self._topic_ready:
            self._replay(waiting)
        if self._spooling:
            with self._lock:
                self._spool.sync_if_due()

    def _replay(self, waiting: int) -> None:
        # Fill the producer's queue up to half its bound (the other half is
        # headroom); replay in spool order, and only stop spooling once
        # nothing is left unread and every replayed record is settled, so new
        # events never overtake spooled ones.
        # Settling: successes are not reported one by one (only failures), so
        # a replayed record counts as settled once the producer's queue is
        # empty (everything handed over before is delivered or failed). A
        # segment's last record is therefore a barrier: the next segment
        # starts once the queue has drained, and the finished segment's file
        # is deleted then. That costs one queue drain (~ linger.ms) per
        # segment (16 MiB by default, ~45k events) and bounds what a crash
        # replays twice to about one segment.
        # At most 10k per tick, so the publish thread never waits long on the lock.
        room = min(self.queue_max_messages // 2 - waiting, 10_000)
        with self._lock:
            if self._in_flight:
                if waiting:
                    if self._in_flight[-1][0].fully_read:
                        return  # barrier: this segment must settle before the next one starts
                else:
                    for seg, count in self._in_flight:
                        for _ in range(count):
                            self._spool.settle(seg)
                    self._in_flight = []
            while room > 0:
                rec = self._held or self._spool.read()
                self._held = None
                if rec is None:
                    if not self._in_flight:
                        self._spooling = False
                        if self.replayed:
                            log.info("spool drained: %d events replayed to Kafka so far", self.replayed)
                    return
                seg, topic, key, value = rec
                try:
                    # The topic it was meant for: a restart with another --topic does not move it.
                    self._producer.produce(topic or self.topic, value, key, on_delivery=self._on_replay_failure)
                except BufferError:
                    self._held = rec
                    return
                self._produced += 1
                self.replayed += 1
                room -= 1
                if self._in_flight and self._in_flight[-1][0] is seg:
                    self._in_flight[-1][1] += 1
                else:
                    self._in_flight.append([seg, 1])
                if seg.fully_read:
                    return  # its last record: settle it before reading the next segment

    # --- librdkafka callbacks (run in the background thread or in close()) ------
    # With delivery.report.only.error only failures arrive here (err is never None).
    def _on_delivery(self, err, msg) -> None:
        if err is None:
            return
        if err.code() in _TAKE_BACK:
            # Purged by us, or refused because the cluster has no such topic
            # (deleted, or a replaced cluster): not lost, back to the spool.
            self._purged_count += 1
            self._purged.append((msg.key(), msg.value(), msg.topic()))
        else:
            self._failed(err, msg)

    def _on_replay_failure(self, err, msg) -> None:
        if err is None:
            return
        if err.code() in (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT):
            # Still in its segment file, which stays (unsettled) and is replayed by the next run.
            self._purged_count += 1
        else:
            self._failed(err, msg)  # settled with its segment: retrying cannot help

    def _failed(self, err, msg) -> None:
        # With retries unbounded, only permanent errors get here (record too
        # large, no authorization, topic deleted): retrying cannot help.
        self.failed += 1
        if self.failed <= 10 or self.failed % 10_000 == 0:
            log.error("Kafka refused an event for good (%s; key %s); %d failed so far",
                      err.str(), (msg.key() or b"").decode(errors="replace"), self.failed)

    def _on_error(self, err) -> None:
        # Transport errors are expected during an outage; the producer retries.
        # (Repeats within a minute are filtered out by _RepeatFilter.) While
        # Kafka has not answered since start, _await_topic already says so
        # every 30 s: its transport errors would only repeat that.
        if not self._topic_ready and err.code() in _TRANSIENT:
            _LIBRDKAFKA_LOG.debug("Kafka: %s", err.str())
            return
        _LIBRDKAFKA_LOG.warning("Kafka: %s", err.str())

    def _on_stats(self, stats_json: str) -> None:
        try:
            stats = json.loads(stats_json)
            self.retried = sum(b.get("txretries", 0) for b in stats.get("brokers", {}).values())
        except (ValueError, AttributeError):
            pass

    # --- flush / close / stats ----------------------------------------------------
    def undelivered(self) -> int:
        """Events not yet known delivered: in the producer, unread in the spool,
        or replayed and not yet settled (their segment file still exists)."""
        with self._lock:
            unread = self._spool.unread + (1 if self._held else 0)
            unsettled = sum(n for _, n in self._in_flight)
        # Replayed records are in the producer until sent, then unsettled until the next tick.
        return max(len(self._producer), unsettled) + unread

    def flush(self, timeout: float) -> int:
        """Wait up to `timeout` s for the queue and the spool to reach Kafka; return what is left."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.undelivered()
            if left == 0 or time.monotonic() >= deadline or not self._thread.is_alive():
                return left
            time.sleep(0.02)

    def close(self, timeout: float = 10.0) -> int:
        """Flush for up to `timeout` s, then keep whatever is undelivered in the spool.

        Returns the number of undelivered events (now in the spool, replayed
        by the next publisher on the same spool directory).
        """
        if self._closed:
            return 0
        self.flush(timeout)
        self._closed = True
        self._stop.set()
        self._thread.join()
        self._cluster_thread.join()
        if self._topic_thread is not None:
            self._topic_thread.join()  # at most one metadata request or topic creation away
        # Take back what the producer still holds, in order, and put it in
        # front of the spool: it is older than anything spooled.
        for retired in self._retired:  # a publish racing a rebuild may have reached the old producer
            self._take_back(retired)
        self._take_back(self._producer)
        # Every message is now delivered, failed or purged (each failure and purge reported).
        self._count_delivered(len(self._producer))
        self._store_taken_back()
        undelivered = self._spool.pending
        self._spool.close()
        level = logging.WARNING if undelivered or self.dropped else logging.INFO
        log.log(level, "Kafka publisher closed: %d delivered, %d failed, %d dropped (spool full), "
                "%d undelivered kept in %s", self.delivered, self.failed, self.dropped, undelivered,
                self._spool.dir)
        self._undelivered_at_close = undelivered
        return undelivered

    def stats(self) -> dict:
        closed = self._closed
        if not closed:
            with self._poll_lock:  # the delivered count is exact right after a poll
                self._producer.poll(0)
                self._count_delivered(len(self._producer))
        with self._lock:
            pending = self._undelivered_at_close if closed else self._spool.pending
            spool_bytes = self._spool.bytes_used
        return {
            "delivered": self.delivered,
            "failed": self.failed,
            "retried": self.retried,
            "dropped": self.dropped,
            "spooled": self.spooled,
            "replayed": self.replayed,
            "queued": 0 if closed else len(self._producer),
            "spool_pending": pending,
            "spool_bytes": spool_bytes,
            "spooling": self._spooling,
            # True while Kafka has not answered since start (all events wait in the spool);
            # "pending" makes it a gauge in the metrics endpoint.
            "topic_check_pending": not self._topic_ready,
        }


class _ProducerLog:
    """The producer's librdkafka log lines, to _LIBRDKAFKA_LOG. While Kafka has
    not answered since start, connection failures go to DEBUG: the start-up
    warnings already say so, every 30 s."""

    _OUTAGE_FACILITIES = ("FAIL", "GETPID")

    def __init__(self, publisher: KafkaPublisher):
        self._publisher = publisher

    def log(self, level: int, msg: str, *args) -> None:
        # confluent-kafka calls log(level, "%s [%s] %s", facility, client name, text)
        if args and args[0] in self._OUTAGE_FACILITIES and not self._publisher._topic_ready:
            level = logging.DEBUG
        _LIBRDKAFKA_LOG.log(level, msg, *args)


_LIBRDKAFKA_LOG = kafka.LIBRDKAFKA_LOG
kafka.guard_logger(log)
