"""Dead letters: messages the sink cannot store go to a Kafka topic, never silently away.

Each dead letter is the original message (key and value untouched) with
headers saying why and where it came from:

    fdpass.reason            bad_magic | unknown_fingerprint | truncated | corrupt_body | clickhouse_rejected
    fdpass.detail            one line: the codec's or ClickHouse's message
    fdpass.original.topic / fdpass.original.partition / fdpass.original.offset

Delivery is at least once: a batch's dead letters are flushed (acked by the
broker) before the batch is marked done and its offsets committed, so a
crash can repeat dead letters but never lose one.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("fdpass.sink")

DEFAULT_SUFFIX = ".dlq"


class DeadLetterError(RuntimeError):
    """Dead letters could not be delivered; the batch must not be committed."""


class DeadLetters:
    def __init__(self, kafka_conf: dict, topic: str):
        from confluent_kafka import Producer

        self.topic = topic
        self.counts: Counter = Counter()
        self._failed: list[str] = []
        self._producer = Producer({
            **kafka_conf,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "zstd",
        })

    def _on_delivery(self, err, msg) -> None:
        if err is not None:
            self._failed.append(str(err))

    def send(self, msg, reason: str, detail: str) -> None:
        """Queue one dead letter; `msg` is the confluent_kafka.Message it replaces."""
        headers = [
            ("fdpass.reason", reason.encode()),
            ("fdpass.detail", detail[:1000].encode("utf-8", "replace")),
            ("fdpass.original.topic", msg.topic().encode()),
            ("fdpass.original.partition", str(msg.partition()).encode()),
            ("fdpass.original.offset", str(msg.offset()).encode()),
        ]
        while True:
            try:
                self._producer.produce(self.topic, value=msg.value(), key=msg.key(), headers=headers,
                                       on_delivery=self._on_delivery)
                break
            except BufferError:  # local queue full: let deliveries drain
                self._producer.poll(0.1)
        self.counts[reason] += 1

    def flush(self, timeout: float = 30.0) -> None:
        left = self._producer.flush(timeout)
        if left or self._failed:
            failed, self._failed = self._failed, []
            raise DeadLetterError(f"{left} dead letters still queued, {len(failed)} failed"
                                  + (f" ({failed[0]})" if failed else "") + f" on topic {self.topic}")

    def close(self) -> None:
        try:
            self.flush(10)
        except DeadLetterError as e:
            log.error("closing: %s", e)
        self._producer = None  # librdkafka's threads end with the object
