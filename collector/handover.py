"""Zero-gap collector restart: a new collector takes over from a running one at a cutover in kernel time.

A restart that stops the old collector before the new one attaches leaves
the transfers in between unwatched (`fdpass query gaps` shows the hole).
Instead (a DaemonSet with maxSurge 1, maxUnavailable 0 starts the new pod
while the old one runs: deploy/kubernetes/), two collectors of the same
output -- the same spool directory, which only one process may hold --
agree on a cutover C, in the kernel's clock (CLOCK_MONOTONIC, the records'
ktime_ns):

    old (holds <spool>/handover.lock)        new
                                             lock busy: a predecessor runs
                                             attach the probes (run id marked, below)
                                             C = CLOCK_MONOTONIC now + LEAD_S: every
                                             call that exits from then on is seen by it
                                             write C to <spool>/handover.cutover
    sees C (a stat() per loop, ~50 ms)
    keeps records with ktime < C only,
    drains until C + GRACE_S, publishes,
    closes its spool, writes
    <spool>/handover.done (C), unlocks
                                             gets the lock; reads handover.done
                                             opens the output (the spool is free)
                                             reads the ring buffer, which held its
                                             records meanwhile, dropping ktime < C

So every record with ktime < C comes from the old collector and every one
with ktime >= C from the new one: each kernel event once -- but for the
edge. Each collector's program reads the clock itself, the old one's first
(attached first), so one syscall exit gets two ktimes a few microseconds
apart, and an exit right at C can be < C for the old one and >= C for the
new one (measured: 40 of 18,750 transfers at ~1000/s were stored twice). On one thread the
two programs' records of successive exits strictly alternate (old, new,
old, new: both run on that thread's exit before it can make another call),
so the old collector lists, per thread and record key, the ktime of its
last record within EDGE_S before C (handover.done), and the new one drops
its first record of that key after that time when it is >= C: the other
copy of the same exit. `gaps` knows a
handover from a restart by the run id (HANDOVER_RUN_BIT, set in the new
run's seq; fdpass/questions.py): a run started that way is covered by its
predecessor up to C, so neither "collector restarted" nor "records lost at
the start of a run" (the dropped records before C took sequence numbers) is
reported for it.

Limits (docs/reliability.md): a call that entered the kernel before the new
collector attached and exits after C (a recvmsg blocked across the handover)
is seen by neither (the old one drops it as >= C, the new one saw no entry):
counting on the records' exit time is what the record layout allows today;
cutting on the entry time would close it. If the old collector dies before
it confirms (no handover.done with C), the new one keeps its records before
C too (no hole; some transfers may be stored twice) and says so. A
predecessor that predates this protocol holds no handover lock: the two then
overlap until the old one is stopped (duplicates, not holes).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import time
from pathlib import Path

from fdpass.collector import records as R
from fdpass.errors import UserError

log = logging.getLogger("fdpass.collect")

HANDOVER_RUN_BIT = 0x4000  # in the 15-bit run id (collector/probes.py RUN_ID_MASK): a run that took over
LEAD_S = 1.0  # C is this far ahead of the announcement: the old collector (a file check per ~50 ms loop) knows it in time
GRACE_S = 0.5  # the old collector drains this long past C: records with ktime < C still in flight reach it
EDGE_S = 0.05  # the old collector lists its last records per thread this close before C (see "the edge")
WAIT_S = 120.0  # how long the new one waits for the old one to finish (its last flush to Kafka included)
_KTIME = struct.Struct("<Q")  # ktime_ns, the first field of every record (bpf/fdpass.h)


def ktime_ns() -> int:
    """The kernel's bpf_ktime_get_ns() clock, read from user space."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class Handover:
    """One collector's side of the protocol, for the output whose exclusive directory is `directory`."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.lock_path = self.dir / "handover.lock"
        self.cutover_path = self.dir / "handover.cutover"
        self.done_path = self.dir / "handover.done"
        self._fd: int | None = None
        self.successor = False  # True: a predecessor ran when this one started
        self.cutover: int | None = None  # C, once agreed
        self._keep_below: int | None = None  # old side: keep ktime < C
        self._drop_below: int | None = None  # new side: drop ktime < C (until records are past C + GRACE_S)
        self._edge: dict[tuple, int] = {}  # old side: its last record's ktime per key near C; new side: the old's
        self.dropped = 0  # records left to the other collector

    # -- both ------------------------------------------------------------------------
    def claim(self) -> bool:
        """Take the handover lock if nobody holds it: True. False: a collector runs on this output
        (this one becomes its successor: take_over() after attaching)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise UserError(f"cannot use spool directory {self.dir}: {e.strerror}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.successor = True
            return False
        self._holding()
        return True

    def _holding(self) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        for p in (self.cutover_path, self.done_path):  # a finished handover's files
            p.unlink(missing_ok=True)

    def keep(self, records: list) -> list:
        """The records this collector stores (the collect loop's filter; records as the ring gives them)."""
        if self._keep_below is not None:
            kept = self._keep_old(records, self._keep_below)
        elif self._drop_below is not None:
            c = self._drop_below
            kept = self._keep_new(records, c)
            if records and _KTIME.unpack_from(records[0])[0] > c + GRACE_S * 1e9:
                self._drop_below = None  # past the cutover for good: no more filtering
        else:
            return records
        self.dropped += len(records) - len(kept)
        return kept

    def _keep_old(self, records: list, c: int) -> list:
        edge, kept = c - int(EDGE_S * 1e9), []
        for r in records:
            t = _KTIME.unpack_from(r)[0]
            if t < c:
                kept.append(r)
                if t >= edge:
                    self._edge[_key(r)] = t
        return kept

    def _keep_new(self, records: list, c: int) -> list:
        edge, kept = c + int(EDGE_S * 1e9), []
        for r in records:
            t = _KTIME.unpack_from(r)[0]
            if t < edge and self._edge:
                k = _key(r)
                if k in self._edge and t > self._edge[k]:  # the other copy of the old one's last record
                    del self._edge[k]
                    continue
            if t >= c:
                kept.append(r)
        return kept

    # -- the old collector -------------------------------------------------------------
    @property
    def handed_over(self) -> bool:
        """A successor's cutover was honoured: this collector stopped for it."""
        return self._keep_below is not None

    def should_stop(self) -> bool:
        """Called once per collect loop: True once a successor's cutover has been drained past."""
        if self._fd is None or self.successor:
            return False
        if self._keep_below is None:
            try:
                c = json.loads(self.cutover_path.read_text())["cutover_ns"]
            except (OSError, ValueError, KeyError, TypeError):
                return False
            self._keep_below = self.cutover = int(c)
            late = ktime_ns() - self.cutover
            log.warning("a new collector is taking over this output: storing the transfers that left the kernel "
                        "before its cutover, then exiting (collector/handover.py)%s",
                        f"; seen {late / 1e9:.2f} s after the cutover (this loop stalled): transfers in between "
                        "may be stored twice" if late > 0 else "")
        return ktime_ns() >= self._keep_below + GRACE_S * 1e9

    def finish(self) -> None:
        """After the last record is published and the output closed: confirm C, let the successor go on."""
        if self._fd is None:
            return
        if self._keep_below is not None:
            _write_atomic(self.done_path, {"pid": os.getpid(), "cutover_ns": self._keep_below,
                                           "dropped": self.dropped,
                                           "edge": [[*k, t] for k, t in self._edge.items()]})
        os.close(self._fd)  # drops the flock
        self._fd = None

    # -- the new collector -------------------------------------------------------------
    def take_over(self, stop=None) -> None:
        """With the probes attached: announce C now, wait for the predecessor to finish, hold the lock.
        Records before C are then dropped by keep() (or kept, if the predecessor did not confirm)."""
        c = ktime_ns() + int(LEAD_S * 1e9)  # the probes are attached: every exit from now on is seen here
        self.cutover = c
        _write_atomic(self.cutover_path, {"pid": os.getpid(), "cutover_ns": c})
        pid = _read(self.lock_path).strip() or "?"
        log.warning("another collector (pid %s) runs on this output: taking over at kernel time %d; it stores "
                    "the transfers before that and exits", pid, c)
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline or (stop is not None and stop()):
                    raise HandoverFailed(f"the collector holding {self.lock_path} (pid {pid}) did not finish "
                                         f"within {WAIT_S:.0f} s of the cutover")
                time.sleep(0.05)
        try:
            done = json.loads(self.done_path.read_text())
        except (OSError, ValueError):
            done = {}
        if done.get("cutover_ns") == c:
            self._drop_below = c
            self._edge = {tuple(e[:-1]): e[-1] for e in done.get("edge", [])}
            log.warning("took over from pid %s at the cutover: no transfer missed, none stored twice", pid)
        else:
            log.error("the previous collector (pid %s) exited without confirming the cutover: keeping every "
                      "transfer seen since attaching (some may be stored twice, none is missed)", pid)
        self._holding()
        self.successor = False  # from now on the holder, and a predecessor to the next one


def add_arguments(p) -> None:
    """`collect`'s options for a restart with no gap (a successor on the same --spool-dir takes over)."""
    g = p.add_argument_group("restart without a gap (with --kafka: a second collector on the same --spool-dir "
                             "takes over at a cutover in kernel time; collector/handover.py)")
    g.add_argument("--after-handover", choices=("exit", "wait"), default="exit",
                   help="once a successor has taken over: exit (default), or wait idle for SIGTERM -- under a "
                        "supervisor that restarts a collector that exits (a DaemonSet), so the old one is not "
                        "started again to take over back")
    g.add_argument("--ready-file", metavar="PATH",
                   help="create PATH once the probes are attached and any predecessor has handed over "
                        "(a readiness probe: the old pod is stopped only then)")


def ready(args) -> None:
    """After attaching (and taking over): the ready file."""
    if getattr(args, "ready_file", None):
        Path(args.ready_file).write_text(f"{os.getpid()}\n")


def handed_over(args, handover: "Handover | None", stopped) -> None:
    """After the collect loop and the output are closed: let a successor go on; with --after-handover wait,
    stay (idle) until a signal, so a supervisor does not start this collector again."""
    if handover is None:
        return
    handover.finish()
    if handover.handed_over and getattr(args, "after_handover", "exit") == "wait":
        log.warning("handed over to the new collector; idle until stopped (--after-handover wait)")
        while not stopped(1.0):
            pass


class HandoverFailed(UserError):
    """The predecessor did not finish in time: said in one line, the new collector exits."""


def _key(raw: bytes) -> tuple:
    """What tells a syscall exit's records apart on one thread: (tid, kind, direction, msg_index, fd_index)."""
    rec = R.decode_bytes(raw)[0]
    return rec.tid, rec.kind, rec.direction, rec.msg_index, rec.fd_index


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _write_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)
