"""Saying that the store refuses inserts: once with the reason, then every REMIND_EVERY s, and when it is back.

Used by the sink's writer threads (sinks/consumer.py) and `fdpass run`'s
store writer (fdpass/run.py). While the store fails they keep the batch,
insert nothing else and commit nothing (docs/reliability.md); a line per
retry would flood the log during a long outage, and no line would leave the
operator guessing, so: the first failure with its reason, a reminder every
30 s with how long and how many attempts, one line when inserts succeed again.

A full disk under the store (ClickHouse: Code 243 NOT_ENOUGH_SPACE, or the
OS's ENOSPC) is named as such, and retried every second instead of with the
usual backoff (up to 30 s): space coming back (a deleted file, a grown
volume) is noticed at once, and a refused reservation costs the store
nothing.
"""

from __future__ import annotations

import logging
import re
import threading
import time

REMIND_EVERY = 30.0  # s between "still failing" lines
DISK_FULL_RETRY = 1.0  # s between attempts while the disk is full

_DISK_FULL = re.compile(r"Code: 243\b|NOT_ENOUGH_SPACE|No space left on device|ENOSPC|Disk quota exceeded")


def is_disk_full(text: str) -> bool:
    return bool(_DISK_FULL.search(text))


def reason(text: str) -> str:
    """What to tell the operator about a store error's text."""
    if is_disk_full(text):
        return f"the store's disk is full ({text}); free space or grow the volume"
    return text


class StoreOutage:
    """One per process part that inserts (the sink's writers share one): thread-safe."""

    def __init__(self, log: logging.Logger, consequence: str):
        self.log = log
        self.consequence = consequence  # e.g. "inserting and committing stopped, nothing is dropped"
        self._lock = threading.Lock()
        self.since: float | None = None  # when the current outage began (monotonic)
        self._said = 0.0
        self.attempts = 0

    @property
    def failing(self) -> bool:
        return self.since is not None

    def failed(self, text: str, backoff: float) -> float:
        """A failed attempt with the error's text; returns how long to wait before the next one."""
        full = is_disk_full(text)
        now = time.monotonic()
        with self._lock:
            self.attempts += 1
            if self.since is None:
                self.since, self._said = now, now
                self.log.error("not storing: %s -- %s; retrying every %s, saying so every %.0f s",
                               reason(text), self.consequence,
                               f"{DISK_FULL_RETRY:.0f} s" if full else "few seconds (backoff up to 30 s)",
                               REMIND_EVERY)
            elif now - self._said >= REMIND_EVERY:
                self._said = now
                self.log.error("still not storing after %.0f s (%d attempts): %s -- %s",
                               now - self.since, self.attempts, reason(text), self.consequence)
        return DISK_FULL_RETRY if full else backoff

    def recovered(self) -> None:
        with self._lock:
            if self.since is None:
                return
            self.log.warning("storing again after %.0f s (%d failed attempts)",
                             time.monotonic() - self.since, self.attempts)
            self.since, self.attempts = None, 0
