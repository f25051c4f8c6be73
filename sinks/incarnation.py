"""Which incarnation of the topic the sink reads: its topic id, confirmed before every insert.

A topic deleted and created again under the same name (a reset environment,
an operator's fix), or a cluster replaced by a new, empty one at the same
address, starts its offsets again at 0. The sink's exactly-once state is
keyed by offsets (sinks/exactly_once.py: the batch log's ranges and the
insert deduplication tokens), so without more the new incarnation's offsets
would be matched against the old one's: ranges recorded "done" by the old
topic would be skipped (events lost) and tokens still in ClickHouse's dedup
window would drop new rows (lost again). And librdkafka does not notice a
recreated topic: a consumer at offset N of the old topic keeps fetching at N
of the new one (measured with librdkafka 2.16 and Kafka 4: offsets 0..N-1 of
the new topic were never delivered), or, when the new topic is shorter, it
resets to the earliest offset and offsets go backwards.

Kafka names each incarnation: the topic id (a UUID, KIP-516), new on every
creation, on every cluster. The sink therefore
- reads the topic id when partitions are assigned and tags every batch, its
  batch-log rows and its tokens with it, and every commit's metadata;
- before inserting a batch, asks Kafka for the topic id again (a check that
  started after the batch's last message was fetched: `confirm`). The same
  id: insert. Another id: the batch may hold the new incarnation's messages
  under the old one's offsets, so it is dropped, not inserted or committed,
  and the sink starts over on the new incarnation from its first offset
  (consumer.py: `_start_over`). No answer (Kafka away): StoreError, the
  writer retries and consumption pauses, as for a failing store;
- looks every CHECK_EVERY s anyway, so an idle sink (or one whose consumer
  is stuck on a cluster that is no longer there) notices too.

A check costs one DescribeTopics round trip (~2 ms on a local broker); the
checks of concurrent batches are shared (one in flight at a time, and one
that started after a batch was cut confirms it). The admin client is made
afresh after a failure: librdkafka's connections refuse a cluster other than
the one they first met ("reports different ClusterId").

What this cannot do (docs/reliability.md): events of the old incarnation the
sink had not read when it vanished are gone with it, and a batch cut in the
milliseconds between the old topic's deletion and the check is dropped too.
"""

from __future__ import annotations

import logging
import threading
import time

from fdpass import kafka
from fdpass.errors import UserError

log = logging.getLogger("fdpass.sink")

CHECK_EVERY = 5.0  # s between checks when no batch asked for one
DESCRIBE_TIMEOUT = 5.0  # s for one DescribeTopics answer


class TopicUnconfirmed(RuntimeError):
    """Kafka did not answer with the topic's id (away, or the topic is missing right now)."""


class TopicReplaced(RuntimeError):
    """The topic has another id than the batch's: a new incarnation."""


class Incarnations:
    """The topic's id as Kafka says it now, asked with one admin client, checks shared between threads."""

    def __init__(self, conf: dict, topic: str):
        self.conf = conf
        self.topic = topic
        self._admin = None
        self._cond = threading.Condition()
        self._checking = False
        self.last_id: str | None = None  # the id of the last answer
        self._answered_at = float("-inf")  # when the check that gave last_id started (monotonic)
        self._tried_at = float("-inf")  # when the last check started, answered or not
        self.last_error = ""

    # -- asking Kafka ------------------------------------------------------------
    def _describe(self) -> str | None:
        """The topic id, or None (with last_error) when Kafka does not say."""
        from confluent_kafka import KafkaError, KafkaException, TopicCollection

        try:
            if self._admin is None:
                self._admin = kafka.admin_client(self.conf)
            fut = self._admin.describe_topics(TopicCollection([self.topic]), request_timeout=DESCRIBE_TIMEOUT)
            desc = fut[self.topic].result(DESCRIBE_TIMEOUT + 1)
            return str(desc.topic_id)
        except KafkaException as e:
            err = e.args[0]
            self.last_error = err.str() if hasattr(err, "str") else str(err)
            if not (hasattr(err, "code") and err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
                self._admin = None  # a fresh client next time (a replaced cluster, see the docstring)
        except (TimeoutError, UserError, ValueError) as e:
            self.last_error = str(e) or type(e).__name__
            self._admin = None
        return None

    def check(self, since: float = float("-inf")) -> str | None:
        """The topic id from a check that started at or after `since` (monotonic): shares a check
        in flight that started late enough, else makes one. None when Kafka did not say."""
        while True:
            with self._cond:
                if self._answered_at >= since:
                    return self.last_id
                if self._checking:
                    self._cond.wait(DESCRIBE_TIMEOUT + 2)
                    continue
                self._checking = True
            started = self._tried_at = time.monotonic()
            found = None
            try:
                found = self._describe()
            finally:
                with self._cond:
                    self._checking = False
                    if found is not None:
                        self.last_id, self._answered_at = found, started
                    self._cond.notify_all()
            if found is None:
                return None

    def confirm(self, incarnation: str, cut_at: float) -> None:
        """Return if the topic still has id `incarnation` by a check that started after cut_at;
        TopicReplaced if it has another, TopicUnconfirmed if Kafka did not say."""
        found = self.check(cut_at)
        if found is None:
            raise TopicUnconfirmed(f"topic {self.topic}'s id not confirmed before the insert: {self.last_error}")
        if found != incarnation:
            raise TopicReplaced(f"topic {self.topic} is another incarnation now (topic id {incarnation} -> {found})")

    def current(self, stop: threading.Event, what: str) -> str | None:
        """The topic id now, waiting (and saying so every 30 s) while Kafka does not give it; None if stopped."""
        waited = 0.0
        said = -30.0
        while True:
            found = self.check(time.monotonic())
            if found is not None:
                return found
            if waited - said >= 30:
                log.warning("%s: waiting for topic %s's id (%s)", what, self.topic, self.last_error)
                said = waited
            if stop.wait(1.0):
                return None
            waited += 1.0

    def changed(self, incarnation: str | None) -> bool:
        """The last answer names another incarnation than `incarnation`."""
        return incarnation is not None and self.last_id is not None and self.last_id != incarnation

    def stale(self) -> bool:
        """No answer for CHECK_EVERY s: time for a look (consumer.py's loop asks in a thread)."""
        return time.monotonic() - max(self._answered_at, self._tried_at) >= CHECK_EVERY and not self._checking


def cluster_id(conf: dict) -> str | None:
    """The cluster id at the bootstrap address now (a fresh client; for the log line of a change)."""
    try:
        md = kafka.admin_client(conf).list_topics(timeout=DESCRIBE_TIMEOUT)
        return md.cluster_id
    except Exception:  # noqa: BLE001 - only for a log line
        return None
