"""Writes one batch of one partition: record, insert (one per writer schema), dead letters, done.

See state.py for why the steps are in this order. A batch holds the Kafka
messages of one offset range of one partition. Messages are grouped by
their writer schema version (normally one group, two during a rolling
upgrade of collectors); each group is one INSERT with the token
"<topic>/<partition>/<first>-<last>/v<version>" -- deterministic, so a
replay of the same range repeats the same tokens, whichever insert format
the replaying sink uses.

The insert format (sinks/conversion.py): a ClickHouse Native block made by
the C transcoder, or, when the extension is not built, an Avro container
that ClickHouse decodes. With Native the whole batch goes to the transcoder
of its first message's writer version, so the common case costs no Python
work per message; messages of another version come back rejected for their
header and form their own groups.

Errors are sorted in two kinds:
- the data is bad. Undecodable messages (the transcoder leaves them out of
  the block) go straight to the DLQ; their reason and detail are the Python
  codec's (the judge of "undecodable"), or the transcoder's where it is the
  stricter (see avro_to_native.c). Rows ClickHouse refuses (a constraint;
  with Avro containers, also bodies its reader cannot parse -- the codec
  names those) are isolated by bisecting; each sub-insert has a token
  derived from its place in the bisection, which is again deterministic.
- anything else (ClickHouse unreachable, table missing, read-only, out of
  disk or memory): `StoreError`; the caller keeps the batch, retries with
  backoff and commits nothing meanwhile.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

from fdpass.schemas import codec
from fdpass.sinks import conversion
from fdpass.sinks.state import token

log = logging.getLogger("fdpass.sink")

# ClickHouse error codes that mean "these rows are bad", not "the store is unwell".
_DATA_ERROR_CODES = {
    6,    # CANNOT_PARSE_TEXT
    26,   # CANNOT_PARSE_QUOTED_STRING
    27,   # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    33,   # CANNOT_READ_ALL_DATA
    38, 41,  # CANNOT_PARSE_DATE / DATETIME
    53,   # TYPE_MISMATCH
    69,   # ARGUMENT_OUT_OF_BOUND
    70,   # CANNOT_CONVERT_TYPE
    72,   # CANNOT_PARSE_NUMBER
    117,  # INCORRECT_DATA
    321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    469,  # VIOLATED_CONSTRAINT
    691,  # UNKNOWN_ELEMENT_OF_ENUM
}
_CODE = re.compile(r"Code: (\d+)")


def is_data_error(exc: Exception) -> bool:
    text = str(exc)
    m = _CODE.search(text)
    if not m:
        return False
    code = int(m.group(1))
    if code == 1001:  # STD_EXCEPTION: a data error only when the Avro decoder threw it
        return "avro::Exception" in text
    return code in _DATA_ERROR_CODES


def short(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:300]


class StoreError(RuntimeError):
    """The store refused or failed an insert for a reason that is not the data's."""


@dataclass
class Batch:
    topic: str
    partition: int
    first: int
    last: int
    messages: list  # confluent_kafka.Message, in offset order
    done_before: bool = False  # a replayed range already marked done: commit only
    replay: bool = False
    cancelled: bool = False  # partition revoked: do not write, do not commit
    nbytes: int = 0
    rows: int = 0  # inserted (set by the writer)
    dead: int = 0
    tokens: list = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.topic}[{self.partition}] offsets {self.first}-{self.last} ({len(self.messages)} msgs)"


_announced = False


def _announce_format(native: bool) -> None:
    """Say once per process which insert format the sink uses, and why."""
    global _announced
    if _announced:
        return
    _announced = True
    if not native:
        log.info("inserting Avro containers (FORMAT Avro): Native blocks are switched off")
    elif conversion.NATIVE_MISSING is not None:
        log.warning("the C transcoder fdpass.sinks._avro_to_native is not importable (%s): inserting Avro "
                    "containers (FORMAT Avro), which cost ClickHouse ~3x the CPU per row; reinstall with a C "
                    "compiler present (scripts/setup) for Native blocks", conversion.NATIVE_MISSING)
    else:
        log.info("inserting ClickHouse Native blocks (C transcoder fdpass.sinks._avro_to_native)")
        for version, why in conversion.NATIVE_UNSUPPORTED.items():
            log.warning("writer schema v%d is inserted as Avro containers: %s", version, why)


class Writer:
    def __init__(self, client, database: str, table: str, batch_log, dead_letters, insert_settings: dict | None = None,
                 native: bool = True):
        self.client = client
        self.table = f"{database}.{table}"
        self.batch_log = batch_log
        self.dlq = dead_letters
        # insert_distributed_sync: on a cluster (events is Distributed) the
        # insert returns only when every shard has its rows, so "stored" means
        # stored and a retried batch is deduplicated by each shard's token.
        self.insert_settings = {"insert_distributed_sync": 1, **(insert_settings or {})}
        # False: Avro containers even where the transcoder could do it (the
        # fallback's path, kept exercised by the tests).
        self.native = native
        self._decoder = codec.Decoder()
        _announce_format(native)

    def _native(self, version: int) -> bool:
        return self.native and conversion.native_supported(version)

    # -- one batch ---------------------------------------------------------------
    def write(self, batch: Batch) -> None:
        """Store a batch completely or raise StoreError (then nothing may be committed)."""
        if batch.done_before:
            return
        msgs = batch.messages
        try:
            self.batch_log.intent(batch.partition, batch.first, batch.last, len(msgs))
        except Exception as e:
            raise StoreError(f"recording the batch range failed: {short(e)}") from e
        rows, dead = 0, []
        pending = self._groups(msgs, dead)
        while pending:
            version, group = pending.pop(0)
            ok, bad, foreign = self._insert_group(version, group,
                                                  token(batch.topic, batch.partition, batch.first, batch.last,
                                                        f"/v{version}"))
            rows += ok
            dead.extend(bad)
            if foreign:  # Native: messages of other writer versions, left out of this version's block
                pending.extend(self._groups(foreign, dead, by_header=True))
        if dead:
            for msg, reason, detail in dead:
                self.dlq.send(msg, reason, detail)
            try:
                self.dlq.flush()
            except Exception as e:
                raise StoreError(f"dead letters not delivered: {e}") from e
        try:
            self.batch_log.done(batch.partition, batch.first, batch.last, len(msgs))
        except Exception as e:
            raise StoreError(f"marking the batch done failed: {short(e)}") from e
        batch.rows, batch.dead = rows, len(dead)

    def _groups(self, msgs: list, dead: list, by_header: bool = False) -> list[tuple[int, list]]:
        """(writer version, messages) to insert, in version order; messages without a usable
        header are added to `dead`.

        Native: one group of every message, for the first message's version
        (the transcoder checks the other headers). By header (Avro, or the
        messages a transcoder left out as foreign): the header check in
        Python, once per message.
        """
        first = None
        for msg in msgs:  # normally stops at the first message
            first = conversion.header_version(msg.value())
            if isinstance(first, int):
                break
        if not isinstance(first, int):  # no message has a known header
            dead.extend(self._dead_letter(m, conversion.header_version(m.value()), "header check failed")
                        for m in msgs)
            return []
        if not by_header and self._native(first):
            return [(first, msgs)]
        groups: dict[int, list] = {}
        by_fp, magic, hlen = conversion.VERSION_BY_FP, conversion.MAGIC, conversion.HEADER_LEN
        for msg in msgs:
            value = msg.value()
            v = by_fp.get(value[2:hlen]) if value is not None and len(value) >= hlen and value[:2] == magic else None
            if v is None:
                dead.append(self._dead_letter(msg, conversion.header_version(value), "header check failed"))
                continue
            group = groups.get(v)
            if group is None:
                groups[v] = [msg]
            else:
                group.append(msg)
        return sorted(groups.items())

    def _dead_letter(self, msg, reason: str, detail: str) -> tuple:
        """(msg, reason, detail): the codec's where it rejects the message (the judge), else the given."""
        try:
            self._decoder.decode(msg.value() or b"")
        except codec.CodecError as e:
            return msg, e.reason, str(e)
        return msg, reason, detail

    def _try_insert(self, version: int, msgs: list, tok: str) -> tuple[list, Exception | None]:
        """Insert what decodes: (the transcoder's rejects, None if stored or the error if ClickHouse
        refused the data); StoreError for any other failure."""
        p = conversion.payload(version, [m.value() for m in msgs], self._native(version))
        if p.rows == 0:
            return p.rejected, None
        try:
            insert_payload(self.client, self.table, p, tok, self.insert_settings)
        except Exception as e:
            if not is_data_error(e):
                raise StoreError(f"insert into {self.table} failed: {short(e)}") from e
            return p.rejected, e
        return p.rejected, None

    def _sort_rejects(self, version: int, msgs: list, rejected: list) -> tuple[list, list]:
        """Messages the transcoder left out -> (dead letters, messages of another writer version)."""
        dead, foreign = [], []
        for i, reason, detail in rejected:
            m = msgs[i]
            v = conversion.header_version(m.value()) if reason != "corrupt_body" else version
            if isinstance(v, int) and v != version:
                foreign.append(m)
            else:
                dead.append(self._dead_letter(m, reason, detail))
        return dead, foreign

    def _insert_group(self, version: int, msgs: list, tok: str) -> tuple[int, list, list]:
        """Insert one writer-version group: (rows inserted, dead letters, messages of other versions)."""
        rejected, error = self._try_insert(version, msgs, tok)
        dead, foreign = self._sort_rejects(version, msgs, rejected)
        if error is None:
            return len(msgs) - len(rejected), dead, foreign
        # ClickHouse refused rows of what was sent.
        left_out = {i for i, _, _ in rejected}
        sent = [m for i, m in enumerate(msgs) if i not in left_out]
        if self._native(version):
            good = sent  # the transcoder left out every message the codec rejects (tests/test_avro_to_native.py)
        else:  # ClickHouse's Avro reader failed on the container: the codec names the undecodable
            good = []
            for m in sent:
                try:
                    self._decoder.decode(m.value())
                    good.append(m)
                except codec.CodecError as ce:
                    dead.append((m, ce.reason, str(ce)))
        log.warning("ClickHouse refused %d rows of %s (%s); bisecting %d", len(sent), tok, short(error), len(good))
        ok, refused = self._bisect(version, good, tok + "/checked")
        return ok, dead + refused, foreign

    def _bisect(self, version: int, msgs: list, tok: str) -> tuple[int, list]:
        """Rows ClickHouse refuses, found by halving; every message here decodes."""
        if not msgs:
            return 0, []
        rejected, error = self._try_insert(version, msgs, tok)
        # (none: these all went through the same transcoder before)
        dead = [self._dead_letter(msgs[i], reason, detail) for i, reason, detail in rejected]
        if error is None:
            return len(msgs) - len(rejected), dead
        if len(msgs) == 1:
            return 0, [(msgs[0], "clickhouse_rejected", short(error))]
        mid = len(msgs) // 2
        a_ok, a_bad = self._bisect(version, msgs[:mid], tok + "/a")
        b_ok, b_bad = self._bisect(version, msgs[mid:], tok + "/b")
        return a_ok + b_ok, a_bad + b_bad


def insert_payload(client, table: str, p: conversion.Payload, token: str, settings: dict) -> None:
    """One INSERT of a payload (conversion.payload), deduplicated by `token`."""
    client.raw_insert(table, column_names=p.columns, insert_block=p.data, fmt=p.fmt,
                      settings={**settings, **p.settings, "insert_deduplication_token": token})


def insert_messages(client, table: str, version: int, values: list[bytes], token: str, settings: dict,
                    native: bool = True) -> list[tuple[int, str, str]]:
    """INSERT single-object encoded messages of writer `version`, deduplicated by `token`:
    the one insert path of the sink and of `fdpass run`.

    Returns the messages left out because they do not decode, as (index,
    reason, detail) -- Native only; an Avro container holding one fails the
    whole insert (a data error, see is_data_error). Raises what the client
    raises.
    """
    p = conversion.payload(version, values, native)
    if p.rows:
        insert_payload(client, table, p, token, settings)
    return p.rejected


def backoff_delays(start: float = 0.5, cap: float = 30.0):
    """0.5, 1, 2, 4 ... capped: how long to wait between attempts at a failing store."""
    d = start
    while True:
        yield d
        d = min(cap, d * 2)


def sleep_unless(stop, seconds: float) -> bool:
    """Sleep, waking early when `stop` (a threading.Event) is set; True if it was."""
    if stop is None:
        time.sleep(seconds)
        return False
    return stop.wait(seconds)
