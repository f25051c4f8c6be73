"""scripts/kafka-local itself: the parts the kafka_broker fixture does not exercise."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from tests.fixtures_kafka import KAFKA_LOCAL, ROOT, free_port


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(KAFKA_LOCAL), *args], capture_output=True, text=True, timeout=timeout)


def test_fetch_is_a_no_op_when_the_jars_are_present():
    first = run("fetch", timeout=600)  # resolves them if this machine has none yet
    assert first.returncode == 0, first.stderr
    libs = Path(os.environ.get("FDPASS_KAFKA_LIBS", ROOT / "var" / "kafka" / "libs"))
    assert list(libs.glob("kafka_2.13-4.*.jar")) and list(libs.glob("log4j-slf4j-impl-*.jar"))
    t = time.monotonic()
    again = run("fetch")
    assert again.returncode == 0 and again.stderr == ""
    assert time.monotonic() - t < 2, "a second fetch must not run Maven"


def test_status_of_a_broker_that_is_not_running(tmp_path):
    out = run("--port", str(free_port()), "--data", str(tmp_path / "b"), "status")
    assert out.returncode == 3 and out.stdout.startswith("stopped")
    out = run("--port", str(free_port()), "--data", str(tmp_path / "b"), "stop")
    assert out.returncode == 0 and "not running" in out.stderr


def test_start_on_a_busy_port_says_so(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run("--port", str(port), "--data", str(tmp_path / "b"), "start")
    assert out.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in out.stderr
    assert out.stdout == ""  # nothing that looks like a bootstrap address


def test_bad_arguments():
    out = run("--port", "abc", "start")
    assert out.returncode == 1 and "--port must be a number" in out.stderr
    out = run("bogus")
    assert out.returncode == 1 and "unknown argument 'bogus'" in out.stderr


def test_start_never_wipes_a_directory_it_did_not_make(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    out = run("--port", str(free_port()), "--data", str(precious), "start")
    assert out.returncode == 1 and "refusing to wipe it" in out.stderr
    assert (precious / "thesis.txt").read_text() == "years of work"


def test_cluster_arguments_and_status_of_a_stopped_cluster(tmp_path):
    out = run("--brokers", "2", "start")
    assert out.returncode == 1 and "--brokers must be 1 or 3..9" in out.stderr
    out = run("--node", "2", "start")
    assert out.returncode == 1 and "--node needs a cluster" in out.stderr
    out = run("--brokers", "3", "--node", "4", "status")
    assert out.returncode == 1 and "--node must be a broker of the cluster, 1..3" in out.stderr
    port = free_port()
    out = run("--brokers", "3", "--port", str(port), "--data", str(tmp_path / "c"), "status")
    assert out.returncode == 3
    assert out.stdout.splitlines() == [f"node {k} stopped 127.0.0.1:{port + k - 1} data {tmp_path}/c/node-{k}"
                                       for k in (1, 2, 3)]
    # one broker alone cannot form the quorum: said at once, not after a 60 s wait
    out = run("--brokers", "3", "--port", str(port), "--data", str(tmp_path / "c"), "--node", "2", "start")
    assert out.returncode == 1 and "node 2 alone has no quorum" in out.stderr
