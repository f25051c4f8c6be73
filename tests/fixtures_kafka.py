"""Fixtures for Kafka tests: a real Apache Kafka broker (scripts/kafka-local).

`kafka_broker` (session scope) starts one broker on a free port with a fresh
data dir under var/, and stops it at the end of the session. Tests that need
an outage call `.stop()` and `.start()` (same port, same data: topics and
offsets survive, as with a real broker restart). A broker that cannot start
fails the test: a missing broker must never turn into skipped tests.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KAFKA_LOCAL = ROOT / "scripts" / "kafka-local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalKafka:
    """One broker run by scripts/kafka-local; `bootstrap` is "127.0.0.1:PORT"."""

    def __init__(self, data_dir: Path, port: int | None = None):
        self.port = port or free_port()
        self.data_dir = Path(data_dir)
        self.bootstrap = f"127.0.0.1:{self.port}"
        self._started_once = False

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(KAFKA_LOCAL), "--port", str(self.port), "--data", str(self.data_dir), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)

    def start(self) -> None:
        """Start (first time: fresh data; later: restart on the same data and port)."""
        args = ["--keep", "start"] if self._started_once else ["start"]
        proc = self._run(*args)
        if proc.returncode != 0:
            raise RuntimeError(f"scripts/kafka-local {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        assert proc.stdout.strip() == self.bootstrap, proc.stdout
        self._started_once = True

    def stop(self) -> None:
        proc = self._run("stop")
        if proc.returncode != 0:
            raise RuntimeError(f"scripts/kafka-local stop failed:\n{proc.stderr}")

    def is_running(self) -> bool:
        return self._run("status").returncode == 0

    def log_tail(self) -> str:
        return self._run("log").stdout


@pytest.fixture(scope="session")
def kafka_broker():
    base = ROOT / "var" / "test-kafka"
    base.mkdir(parents=True, exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix=f"broker-{os.getpid()}-", dir=base))
    broker = LocalKafka(data_dir)
    try:
        broker.start()
    except Exception as exc:
        pytest.fail(f"the local Kafka broker did not start: {exc}", pytrace=False)
    try:
        yield broker
    finally:
        broker.stop()
        subprocess.run(["rm", "-rf", str(data_dir)], check=False)
