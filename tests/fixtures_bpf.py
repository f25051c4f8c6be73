"""Fixtures that run the real probes (root, BTF, bcc).

The probes are compiled and loaded once per session (2-3 s with clang);
tests tell their own events apart by the inode of their own socket.
FDPASS_REQUIRE_BPF=1 (set in CI) turns "cannot load probes here" from a
skip into a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

REQUIRE_BPF = os.environ.get("FDPASS_REQUIRE_BPF") == "1"
# The backend the shared `live` collector runs (auto: kernel where it loads).
# scripts/vm-test runs the capture tests with FDPASS_TEST_BACKEND=kernel, and
# FDPASS_REQUIRE_KERNEL_BACKEND=1 makes a kernel_backend test that cannot load
# it a failure there; elsewhere (kprobes off, fentry refused) it is a skip,
# FDPASS_REQUIRE_BPF=1 or not: such a host cannot have it.
BACKEND = os.environ.get("FDPASS_TEST_BACKEND", "auto")
REQUIRE_KERNEL_BACKEND = os.environ.get("FDPASS_REQUIRE_KERNEL_BACKEND") == "1"


def bpf_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "eBPF tests need root"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "no BTF on this kernel"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc is not importable (run scripts/setup)"
    return None


def require_bpf() -> None:
    reason = bpf_unavailable_reason()
    if reason:
        if REQUIRE_BPF:
            pytest.fail(f"FDPASS_REQUIRE_BPF=1 but {reason}")
        pytest.skip(reason)


def require_kernel_backend() -> None:
    require_bpf()
    from fdpass.collector.probes import kernel_unavailable_reason

    reason = kernel_unavailable_reason()
    if reason:
        if REQUIRE_KERNEL_BACKEND:
            pytest.fail(f"FDPASS_REQUIRE_KERNEL_BACKEND=1 but the in-kernel backend cannot load: {reason}")
        pytest.skip(f"the in-kernel backend cannot load on this kernel ({reason}); scripts/vm-test runs it")


class LiveCollector:
    """The real Collector draining in a background thread, keeping every event."""

    def __init__(self, filters=None, tuning=None, backend=BACKEND):
        from fdpass.collector.collect import Collector

        self.events: list[dict] = []
        self._lock = threading.Lock()
        self.collector = Collector(self._add, filters, tuning=tuning, backend=backend)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.final_stats: dict | None = None

    def _add(self, event: dict) -> None:
        with self._lock:
            self.events.append(event)

    def _run(self) -> None:
        self.final_stats = self.collector.run()

    def matching(self, pred) -> list[dict]:
        with self._lock:
            return [e for e in self.events if pred(e)]

    def wait(self, pred, count: int, timeout: float = 10.0, settle: float = 0.3) -> list[dict]:
        """Events matching pred once `count` have arrived (then a short settle
        to catch any extra, wrong ones), or whatever arrived by the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.matching(pred)) >= count:
                time.sleep(settle)
                break
            time.sleep(0.02)
        return sorted(self.matching(pred), key=lambda e: (e["time_ns"], e["direction"], e["msg_index"], e["fd_index"]))

    def for_socks(self, *socks, count: int, timeout: float = 10.0) -> list[dict]:
        inos = {os.fstat(s.fileno()).st_ino for s in socks}
        return self.wait(lambda e: e["sock_ino"] in inos, count, timeout)

    def close(self) -> dict:
        self.collector.stop()
        self._thread.join(10)
        return self.final_stats or {}


@pytest.fixture(scope="session")
def live():
    require_bpf()
    lc = LiveCollector()
    yield lc
    lc.close()


FDPASS = [sys.executable, "-m", "fdpass.cli"]


def spawn_attached(*args: str, timeout: float = 90) -> subprocess.Popen:
    """Start `fdpass ARGS...` and return once it says "probes attached" on
    stderr (the rest of stderr stays readable); fail with what it printed."""
    p = subprocess.Popen(FDPASS + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        line = p.stderr.readline()
        seen.append(line)
        if "probes attached" in line:
            return p
        if (not line and p.poll() is not None) or time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"fdpass {' '.join(args)} did not attach: " + "".join(seen))
