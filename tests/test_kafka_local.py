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
