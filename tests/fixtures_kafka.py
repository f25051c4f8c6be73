"""Fixtures for Kafka tests: a real Apache Kafka broker (scripts/kafka-local).

`kafka_broker` (session scope) starts one broker on a free port with a fresh
data dir under var/, and stops it at the end of the session. Tests that need
an outage call `.stop()` and `.start()` (same port, same data: topics and
offsets survive, as with a real broker restart). A broker that cannot start
fails the test: a missing broker must never turn into skipped tests.

`kafka_cluster` (function scope: three JVMs are too heavy to keep for the
session on a small machine) starts a 3-broker cluster (`--brokers 3`) the
same way; `.kill9(node)` and `.start_node(node)` take one broker away and
bring it back on its data.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KAFKA_LOCAL = ROOT / "scripts" / "kafka-local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports_in_a_row(n: int) -> int:
    """The first of n consecutive free ports (a cluster's brokers listen on P..P+n-1)."""
    for _ in range(100):
        base = free_port()
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports on 127.0.0.1")


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


class LocalKafkaCluster:
    """A cluster run by scripts/kafka-local --brokers N; `bootstrap` lists every broker.

    Broker K (1..N) is KRaft node id K, on port `port + K - 1`.
    """

    def __init__(self, data_dir: Path, brokers: int = 3):
        self.brokers = brokers
        self.port = free_ports_in_a_row(brokers)
        self.data_dir = Path(data_dir)
        self.ports = {k: self.port + k - 1 for k in range(1, brokers + 1)}
        self.bootstrap = ",".join(f"127.0.0.1:{p}" for p in self.ports.values())

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(KAFKA_LOCAL), "--brokers", str(self.brokers), "--port", str(self.port),
               "--data", str(self.data_dir), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)

    def _must(self, *args: str) -> subprocess.CompletedProcess:
        proc = self._run(*args)
        if proc.returncode != 0:
            raise RuntimeError(f"scripts/kafka-local {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def start(self) -> None:
        """A fresh cluster; every broker answers with all N registered when this returns."""
        assert self._must("start").stdout.strip() == self.bootstrap

    def stop(self) -> None:
        self._must("stop")

    def pid(self, node: int) -> int | None:
        """The broker's pid, None when it is stopped (`status` says "node K running ... pid N ...")."""
        words = self._run("--node", str(node), "status").stdout.split()
        return int(words[words.index("pid") + 1]) if "running" in words else None

    def kill9(self, node: int) -> float:
        """SIGKILL broker `node` (no controlled shutdown: its partitions need a failover), wait until it is
        gone and return when (time.monotonic()) the signal was sent."""
        pid = self.pid(node)
        assert pid is not None, f"broker {node} is not running"
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        deadline = killed_at + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return killed_at
            time.sleep(0.05)
        raise RuntimeError(f"broker {node} (pid {pid}) still there 30 s after SIGKILL")

    def start_node(self, node: int) -> None:
        """Restart broker `node` on its data; returns once it is registered and unfenced again."""
        self._must("--node", str(node), "start")

    def log_tail(self) -> str:
        return self._run("log").stdout


def fresh_data_dir(prefix: str) -> Path:
    """A new, empty instance dir for test brokers under var/test-kafka (git-ignored)."""
    base = ROOT / "var" / "test-kafka"
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=base))


@pytest.fixture
def kafka_cluster():
    data_dir = fresh_data_dir("cluster")
    cluster = LocalKafkaCluster(data_dir)
    try:
        cluster.start()
    except Exception as exc:
        cluster._run("stop")  # whatever did come up
        pytest.fail(f"the local 3-broker Kafka cluster did not start: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
        subprocess.run(["rm", "-rf", str(data_dir)], check=False)


@pytest.fixture(scope="session")
def kafka_broker():
    data_dir = fresh_data_dir("broker")
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
