"""A burst the per-record Python path could not take: 200k events from a C
workload as fast as it passes fds (~1-2 s here, 100-200k events/s; the old
path lost half of everything past ~50k events/s), through `fdpass run`,
every one stored and no kernel drop (pytest -s prints the burst's rate)."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.fixtures_bpf import require_bpf, spawn_attached

pytestmark = pytest.mark.bpf

WORKLOAD = Path(__file__).resolve().parent.parent / "bench" / "capture_workload.c"
TRANSFERS = 100_000  # 2 events each


def test_run_stores_a_burst_of_200k_events_without_loss(tmp_path):
    require_bpf()
    binary = tmp_path / "capture_workload"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(WORKLOAD)], check=True)
    wl = subprocess.Popen([str(binary), "0", str(TRANSFERS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pid = wl.stdout.readline().split()[1]
        p = spawn_attached("run", "--store", str(tmp_path / "store"), "--pid", pid, "--no-status")
        try:
            wl.stdin.write("go\n")
            wl.stdin.flush()
            _, n, seconds = wl.stdout.readline().split()
            assert wl.wait(30) == 0 and int(n) == TRANSFERS
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
    finally:
        if wl.poll() is None:
            wl.kill()
    stats = dict(re.findall(r"(\w+)=(\w+)", err.split("stopped;", 1)[1].splitlines()[0]))
    print(f"\nburst: {2 * TRANSFERS} events in {float(seconds):.2f} s ({2 * TRANSFERS / float(seconds):,.0f} events/s)")
    assert p.returncode == 0, err
    assert stats["kernel_ringbuf_drops"] == "0", err
    assert int(stats["events_send"]) == int(stats["events_recv"]) == TRANSFERS, err
    assert int(stats["stored"]) == 2 * TRANSFERS, err
