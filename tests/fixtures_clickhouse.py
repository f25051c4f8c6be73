"""Fixtures for ClickHouse (chDB) and sink tests: real chDB stores in tmp dirs, real Kafka.

chDB opens one store per process. Tests that run the sink as a subprocess
read the store through `fdpass query --json` in another subprocess once the
sink has exited (or through the sink's own process); tests that run sinks
in-process (`open_store`) close the store at the end, so the next test may
open another directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FDPASS = [sys.executable, "-m", "fdpass.cli"]


def insert_messages(client, table: str, version: int, values: list[bytes], token: str, native: bool = True) -> list:
    """One INSERT of encoded messages of writer `version` through the sink's conversion and insert
    steps, deduplicated by `token`: the rejected messages (index, reason, detail)."""
    from fdpass.sinks import conversion
    from fdpass.sinks.writer import insert_payload

    p = conversion.payload(version, values, native)
    if p.rows:
        insert_payload(client, table, p, token, {})
    return p.rejected


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[topic].result(30)


def produce(bootstrap: str, topic: str, values: list[bytes], keys: list[bytes] | None = None,
            partition_of=None) -> None:
    """Produce and wait for every ack; a failed delivery fails the test."""
    from confluent_kafka import Producer

    errors = []
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10, "enable.idempotence": True, "acks": "all"})
    for i, v in enumerate(values):
        kw = {}
        if keys is not None:
            kw["key"] = keys[i]
        if partition_of is not None:
            kw["partition"] = partition_of(i)
        while True:
            try:
                p.produce(topic, v, on_delivery=lambda err, msg: err and errors.append(err), **kw)
                break
            except BufferError:
                p.poll(0.05)
    assert p.flush(60) == 0, "messages left unflushed"
    assert not errors, errors[:3]


def consume_all(bootstrap: str, topic: str, expect: int, timeout: float = 60) -> list:
    """Read a topic from the beginning (no group commits) until `expect` messages or timeout."""
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("reader"), "auto.offset.reset": "earliest",
                  "enable.auto.commit": False})
    c.subscribe([topic])
    out = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expect and time.monotonic() < deadline:
            for m in c.consume(1000, 0.5):
                if m.error() is None:
                    out.append(m)
        # a little longer: more than expected would be a bug the caller should see
        for m in c.consume(1000, 1.0):
            if m.error() is None:
                out.append(m)
    finally:
        c.close()
    return out


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=30)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


def query_json(store: Path, sql: str) -> list[dict]:
    """Rows of `sql` on a chDB store, through `fdpass query --json` in a subprocess."""
    proc = subprocess.run([*FDPASS, "query", "--clickhouse", f"chdb://{store}", "--json", sql],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


class SinkProcess:
    """`fdpass sink` as a child process, its log in a file."""

    def __init__(self, bootstrap: str, topic: str, store: Path, log_path: Path, *extra: str, env: dict | None = None):
        self.args = [*FDPASS, "sink", "--kafka", bootstrap, "--topic", topic, "--clickhouse", f"chdb://{store}",
                     "--status-every", "1", *extra]
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "SinkProcess":
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env)
        return self

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()

    def stop(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._log.close()
        return rc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"sink exited ({self.proc.returncode}) before logging {text!r}:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"sink did not log {text!r} within {timeout}s:\n{self.log()[-3000:]}")


@pytest.fixture
def store_dir(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def open_store(store_dir):
    """An in-process store (chDB) on a tmp dir; closed after the test so the next can open another."""
    from fdpass.sinks.store import open_store as _open

    stores = []

    def _factory(path: Path | None = None):
        s = _open(f"chdb://{path or store_dir}")
        stores.append(s)
        return s

    yield _factory
    for s in stores:
        s.close()


# Faster group failover in tests: a restarted sink waits for the killed
# one's session to expire (6 s is the broker's minimum).
FAST_GROUP_ENV = {"FDPASS_KAFKA_SESSION_TIMEOUT_MS": "6000"}


def wait_until(cond, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("wm")})
    try:
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in range(partitions)}
    finally:
        c.close()


def all_committed(bootstrap: str, group: str, topic: str, partitions: int) -> bool:
    ends = end_offsets(bootstrap, topic, partitions)
    return committed_offsets(bootstrap, group, topic, partitions) == ends


class ThreadSink:
    """A Sink running in a thread of the test process (shares the test's in-process chDB store)."""

    def __init__(self, store, cfg):
        import threading

        from fdpass.sinks.consumer import Sink

        self.sink = Sink(cfg, store)
        self.rc = None
        self.exc: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"sink-{cfg.group}", daemon=True)

    def _run(self):
        try:
            self.rc = self.sink.run()
        except BaseException as e:  # surfaced by stop()
            self.exc = e

    def start(self) -> "ThreadSink":
        self.thread.start()
        return self

    def stop(self, timeout: float = 60) -> int:
        self.sink.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "sink thread did not stop"
        if self.exc:
            raise self.exc
        return self.rc
