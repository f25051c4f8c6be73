"""The collector's run loop: probes -> records -> contract events -> an output.

Outputs are callables taking one event dict (JSON lines on stdout), or a
batch of encoded Avro messages (the Kafka publisher, the embedded store);
records are read from the ring buffer in batches; the loop owns draining, stopping on
--duration or SIGINT/SIGTERM, and the accounting of what the kernel side
could not report (drops, bounds), which it never keeps quiet about."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from fdpass.collector import records as R
from fdpass.collector.batch import BatchEncoder
from fdpass.collector.enrich import Enricher
from fdpass.collector.handover import HANDOVER_RUN_BIT
from fdpass.collector.kernel_calls import KernelCalls
from fdpass.collector.probes import DEFAULT_RINGBUF_PAGES, READ_BATCH, Filters, open_probes
from fdpass.schemas import codec
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


HOLD_POLL_S = 0.01  # how often the final drain looks whether the output still holds



def process_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def cpu_summary(since: float, stats: dict) -> dict:
    """CPU of every thread of the process since `since` (for `run` that includes ClickHouse's
    inserts), per event captured: the figure the capture benchmark reports, printed by every run."""
    cpu = process_cpu_seconds() - since
    events = stats["events_send"] + stats["events_recv"]
    return {"cpu_seconds": round(cpu, 2), "cpu_us_per_event": round(cpu / events * 1e6, 2) if events else 0}

class Collector:
    """output(event dict) per event (tests, benchmarks), or
    encoded_output(values) per batch of Avro messages (Kafka, the embedded
    store) or, with jsonl, of JSON lines (bytes), which the C encoder writes
    straight from the records. While
    hold() is true the output wants nothing more: records wait in the kernel
    ring buffer (the final drain at stop takes them all, at the pace the output
    makes room: what the ring buffer held never lands in memory at once)."""

    def __init__(self, output: Callable[[dict], None] | None = None, filters: Filters | None = None,
                 ringbuf_pages: int = DEFAULT_RINGBUF_PAGES,
                 tuning: dict[str, int] | None = None, *,
                 encoded_output: Callable[[list], None] | None = None,
                 hold: Callable[[], bool] | None = None, jsonl: bool = False, prefer_c: bool = True,
                 backend: str = "auto", handover=None):
        """backend: auto, kernel or tracepoint (collector/probes.py: open_probes)."""
        if (output is None) == (encoded_output is None):
            raise ValueError("Collector needs exactly one of output and encoded_output")
        self.output = output
        self.encoded_output = encoded_output
        self.hold = hold
        self.counters = Counters()
        self.enricher = Enricher()
        self.batch = BatchEncoder(self.enricher, prefer_c, jsonl) if encoded_output else None
        self._encode_one = (lambda e: (json.dumps(e, separators=(",", ":")) + "\n").encode()) if jsonl else codec.encode
        # A zero-gap restart (collector/handover.py): it filters records by the cutover and stops the loop.
        self.handover = handover
        self.probes = open_probes(filters, ringbuf_pages=ringbuf_pages, tuning=tuning, backend=backend,
                                  run_flags=HANDOVER_RUN_BIT if handover is not None and handover.successor else 0)
        log.info("capture backend: %s (%s)", self.probes.backend, self.probes.why)
        # The kernel backend's FD records are completed by later records of
        # their call before they are events (collector/kernel_calls.py).
        self.kernel_calls = KernelCalls() if self.probes.backend == "kernel" else None
        self.probes.open(prefer_c)
        self._stop = threading.Event()
        self.output_closed = False

    def _output_failed(self, e: Exception, n: int = 1) -> None:
        before = self.counters.output_errors
        self.counters.output_errors += n
        # log the 1st, 10th, 100th and every 1000th
        if any(before < mark <= self.counters.output_errors for mark in (1, 10, 100)) or \
                before // 1000 != self.counters.output_errors // 1000:
            log.error("could not hand an event on (%d so far): %s", self.counters.output_errors, e)

    def _record(self, raw: bytes) -> None:
        """One record the per-record Python path: events, loss records, bad records."""
        try:
            rec, path = R.decode_bytes(raw)
        except ValueError as e:
            self.counters.bad_records += 1
            log.error("%s", e)
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
        try:
            event = self.enricher.event(rec, path)
        except ValueError as e:  # a field the decoder cannot name (enrich.py says which)
            self.counters.bad_records += 1
            log.error("%s", e)
            return
        self.counters.events[event["direction"]] += 1
        try:
            if self.output is not None:
                self.output(event)
            else:
                self.encoded_output([self._encode_one(event)])
        except BrokenPipeError:  # `fdpass collect --jsonl | head`: the reader is gone
            self.output_closed = True
            self._stop.set()
        except Exception as e:
            self._output_failed(e)

    def _complete_kernel_records(self, records: list[bytes]) -> list[bytes]:
        """The kernel backend's batch -> its FD records completed by their
        message's and call's end (MSG_END, CALL_END: collector/kernel_calls.py),
        packed back into record bytes so that the same encoders (C or Python)
        take them; the FD records of calls still running wait for a later batch."""
        out = []
        add, decode, pack = self.kernel_calls.add, R.decode_bytes, R.encode_bytes
        for raw in records:
            try:
                rec, path = decode(raw)
            except ValueError:
                out.append(raw)  # _record counts and logs it
                continue
            if rec.probe != R.PROBE_FENTRY:
                out.append(raw)
                continue
            for done, done_path in add(rec, path):
                out.append(pack(done, done_path))
        return out

    def _handle(self, records: list[bytes]) -> None:
        if self.kernel_calls is not None:
            records = self._complete_kernel_records(records)
        if self.handover is not None:
            records = self.handover.keep(records)
        if self.batch is None:
            for raw in records:
                self._record(raw)
                if self.output_closed:
                    return
            return
        values, n_send, n_recv, others = self.batch.encode(records)
        self.counters.events["SEND"] += n_send
        self.counters.events["RECV"] += n_recv
        if values:
            try:
                self.encoded_output(values)
            except BrokenPipeError:
                self.output_closed = True
                self._stop.set()
                return
            except Exception as e:
                self._output_failed(e, len(values))
        for raw in others:
            self._record(raw)

    def drain(self, timeout_ms: int, final: bool = False) -> None:
        """Wait up to timeout_ms for records, then handle every committed one, a
        batch at a time, until the output holds; the final drain goes on to the
        last record, waiting out each hold (the output drains meanwhile)."""
        if not final and self.hold is not None and self.hold():
            self._stop.wait(timeout_ms / 1000)
            return
        records = self.probes.read(timeout_ms)
        while records:
            self._handle(records)
            if len(records) < READ_BATCH:
                return
            if self.hold is not None and self.hold():
                if not final:
                    return
                while self.hold():
                    time.sleep(HOLD_POLL_S)
            records = self.probes.read(0)

    def stop(self) -> None:
        self._stop.set()

    def stats(self) -> dict:
        k = self.probes.stats()
        return {
            "events_send": self.counters.events["SEND"],
            "events_recv": self.counters.events["RECV"],
            "kernel_ringbuf_drops": k["ringbuf_drops"],
            # calls not tracked because a pending map was full: syscalls' and io_uring requests'
            "kernel_pending_full": k["pending_full"] + k["uring_full"],
            # io_uring requests with IOSQE_CQE_SKIP_SUCCESS: their success is invisible to tracepoints
            "kernel_uring_unseen": k["uring_unseen"],
            "kernel_budget_exhausted": k["budget_exhausted"],
            "kernel_pending_spilled": k["pending_spilled"],
            "loss_records": self.counters.loss_records,
            "kernel_calls_unfinished": self.kernel_calls.unfinished_dropped if self.kernel_calls else 0,
            # receives that reused their send's walk (the short form), and those whose send was not
            # kept (should stay 0: docs/kernel.md, "Receives reuse the send's walk")
            "kernel_recv_reused": self.kernel_calls.recv_reused if self.kernel_calls else 0,
            "kernel_recv_unresolved": self.kernel_calls.recv_unresolved if self.kernel_calls else 0,
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
        self.cpu_start = process_cpu_seconds()  # after the compile and attach: capturing, not starting
        while not self._stop.is_set():
            self.drain(50)
            if tick:
                try:
                    tick()
                except BrokenPipeError:  # the tick flushes the output: same as in _on_record
                    self.output_closed = True
                    break
            if deadline and time.monotonic() >= deadline:
                break
            if self.handover is not None and self.handover.should_stop():
                break
        self.drain(0, final=True)
        stats = self.stats()
        self.probes.close()
        stats.update(cpu_summary(self.cpu_start, stats))
        return stats
