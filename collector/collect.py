"""The collector's run loop: probes -> records -> contract events -> an output.

Outputs are callables taking one event dict (JSON lines on stdout, the Kafka
publisher, the embedded store); the loop owns draining, stopping on
--duration or SIGINT/SIGTERM, and the accounting of what the kernel side
could not report (drops, bounds), which it never keeps quiet about."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from fdpass.collector import records as R
from fdpass.collector.enrich import Enricher
from fdpass.collector.kernel_calls import KernelCalls
from fdpass.collector.probes import DEFAULT_RINGBUF_PAGES, Filters, open_probes
from fdpass.errors import UserError

log = logging.getLogger("fdpass.collect")


@dataclass
class Counters:
    events: dict = field(default_factory=lambda: {"SEND": 0, "RECV": 0})
    loss_records: int = 0
    lost_fds_known: int = 0
    bad_records: int = 0
    output_errors: int = 0


def mntns_of_pid(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/mnt").st_ino


def mntns_of_container(container: str) -> tuple[int, ...]:
    """Mount namespaces of the running processes whose cgroup path names the container."""
    if len(container) < 4 or not all(c in "0123456789abcdef" for c in container.lower()):
        raise UserError(f"--container {container!r}: expected a container id (at least 4 hex digits)")
    container = container.lower()
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cgroup") as f:
                if container in f.read():
                    found.add(mntns_of_pid(int(name)))
        except OSError:
            continue
    if not found:
        raise UserError(f"--container {container}: no running process belongs to a container with that id")
    return tuple(sorted(found))


class Collector:
    def __init__(self, output: Callable[[dict], None], filters: Filters | None = None,
                 ringbuf_pages: int = DEFAULT_RINGBUF_PAGES,
                 tuning: dict[str, int] | None = None, backend: str = "auto"):
        """backend: auto, kernel or tracepoint (collector/probes.py: open_probes)."""
        self.output = output
        self.counters = Counters()
        self.enricher = Enricher()
        self.kernel_calls = KernelCalls()
        self.probes = open_probes(filters, ringbuf_pages=ringbuf_pages, tuning=tuning, backend=backend)
        log.info("capture backend: %s (%s)", self.probes.backend, self.probes.why)
        self.probes.open(self._on_record)
        self._stop = threading.Event()
        self.output_closed = False

    def _on_record(self, data: int, size: int) -> None:
        try:
            rec, raw = R.decode(data, size)
        except ValueError as e:
            self.counters.bad_records += 1
            log.error("%s", e)
            return
        if rec.probe == R.PROBE_FENTRY:
            for done, done_raw in self.kernel_calls.add(rec, raw):
                self._report(done, done_raw)
            return
        if rec.kind == R.KIND_LOSS:
            self.counters.loss_records += 1
            self.counters.lost_fds_known += rec.fd_count
            log.warning(
                "pid %d tid %d %s: descriptors beyond the probe's walk budget not reported "
                "(message %d, from fd index %d; %s)",
                rec.pid, rec.tid, R.SYSCALLS.get(rec.syscall, "?"), rec.msg_index, rec.fd_index,
                f"{rec.fd_count} fds" if rec.fd_count else "whole messages",
            )
            return
        self._report(rec, raw)

    def _report(self, rec: R.Record, raw: bytes) -> None:
        event = self.enricher.event(rec, raw)
        self.counters.events[event["direction"]] += 1
        # This runs inside bcc's C callback, where an exception would only be
        # printed and the next record delivered: handle every one here.
        try:
            self.output(event)
        except BrokenPipeError:  # `fdpass collect --jsonl | head`: the reader is gone
            self.output_closed = True
            self._stop.set()
        except Exception as e:
            self.counters.output_errors += 1
            if self.counters.output_errors in (1, 10, 100) or self.counters.output_errors % 1000 == 0:
                log.error("could not hand an event on (%d so far): %s", self.counters.output_errors, e)

    def stop(self) -> None:
        self._stop.set()

    def stats(self) -> dict:
        k = self.probes.stats()
        return {
            "events_send": self.counters.events["SEND"],
            "events_recv": self.counters.events["RECV"],
            "kernel_ringbuf_drops": k["ringbuf_drops"],
            "kernel_pending_full": k["pending_full"],
            "kernel_budget_exhausted": k["budget_exhausted"],
            "kernel_pending_spilled": k["pending_spilled"],
            "loss_records": self.counters.loss_records,
            "kernel_calls_unfinished": self.kernel_calls.unfinished_dropped,
            "bad_records": self.counters.bad_records,
            "output_errors": self.counters.output_errors,
        }

    def stop_on_signals(self) -> None:
        """SIGINT/SIGTERM stop the loop after a last drain. Commands call this
        before they announce "probes attached", so a signal sent the moment
        the line appears is never the default (fatal, nothing flushed) one."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())

    def run(self, duration: float | None = None, tick: Callable[[], None] | None = None) -> dict:
        """Drain until stopped or --duration elapses; then a last drain."""
        deadline = time.monotonic() + duration if duration else None
        while not self._stop.is_set():
            self.probes.drain(50)
            if tick:
                try:
                    tick()
                except BrokenPipeError:  # the tick flushes the output: same as in _on_record
                    self.output_closed = True
                    break
            if deadline and time.monotonic() >= deadline:
                break
        self.probes.drain(0)
        stats = self.stats()
        self.probes.close()
        return stats
