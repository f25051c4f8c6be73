"""Writes one batch of one partition: record, insert (one per writer schema), dead letters, done.

See state.py for why the steps are in this order. A batch holds the Kafka
messages of one offset range of one partition. Messages are grouped by
their writer schema version (normally one group, two during a rolling
upgrade of collectors); each group is one INSERT ... FORMAT Avro with the
token "<topic>/<partition>/<first>-<last>/v<version>" -- deterministic, so a
replay of the same range repeats the same tokens.

Errors are sorted in two kinds:
- the data is bad (ClickHouse cannot parse a body, a constraint rejects a
  row): the writer isolates the culprits -- first by decoding every message
  of the group with the Python codec (the judge of "undecodable", giving the
  DLQ reason), then, if ClickHouse still refuses what the codec accepts, by
  bisecting; each sub-insert has a token derived from its place in the
  bisection, which is again deterministic. Culprits go to the DLQ.
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


class Writer:
    def __init__(self, client, database: str, table: str, batch_log, dead_letters, insert_settings: dict | None = None):
        self.client = client
        self.table = f"{database}.{table}"
        self.batch_log = batch_log
        self.dlq = dead_letters
        # Older writer schemas lack the newer columns: ClickHouse fills them
        # with the column defaults (the Avro defaults of fields.py's additions)
        # instead of refusing the file.
        # insert_distributed_sync: on a cluster (events is Distributed) the
        # insert returns only when every shard has its rows, so "stored" means
        # stored and a retried batch is deduplicated by each shard's token.
        self.insert_settings = {"input_format_avro_allow_missing_fields": 1, "insert_distributed_sync": 1,
                                **(insert_settings or {})}
        self._decoder = codec.Decoder()

    # -- one batch ---------------------------------------------------------------
    def write(self, batch: Batch) -> None:
        """Store a batch completely or raise StoreError (then nothing may be committed)."""
        if batch.done_before:
            return
        groups: dict[int, list] = {}
        dead: list[tuple] = []
        # The header check, inlined for the common case (runs once per message).
        by_fp, magic, hlen = conversion.VERSION_BY_FP, conversion.MAGIC, conversion.HEADER_LEN
        for msg in batch.messages:
            value = msg.value()
            v = by_fp.get(value[2:hlen]) if value is not None and len(value) >= hlen and value[:2] == magic else None
            if v is None:
                reason = conversion.header_version(value)
                dead.append((msg, reason, self._codec_detail(value)))
                continue
            group = groups.get(v)
            if group is None:
                groups[v] = [msg]
            else:
                group.append(msg)
        try:
            self.batch_log.intent(batch.partition, batch.first, batch.last, len(batch.messages))
        except Exception as e:
            raise StoreError(f"recording the batch range failed: {short(e)}") from e
        rows = 0
        for version in sorted(groups):
            base = token(batch.topic, batch.partition, batch.first, batch.last, f"/v{version}")
            ok, bad = self._insert_group(version, groups[version], base)
            rows += ok
            dead.extend(bad)
        if dead:
            for msg, reason, detail in dead:
                self.dlq.send(msg, reason, detail)
            try:
                self.dlq.flush()
            except Exception as e:
                raise StoreError(f"dead letters not delivered: {e}") from e
        try:
            self.batch_log.done(batch.partition, batch.first, batch.last, len(batch.messages))
        except Exception as e:
            raise StoreError(f"marking the batch done failed: {short(e)}") from e
        batch.rows, batch.dead = rows, len(dead)

    def _codec_detail(self, value) -> str:
        try:
            self._decoder.decode(value or b"")
        except codec.CodecError as e:
            return str(e)
        return "header check failed"

    def _insert(self, version: int, msgs: list, tok: str) -> None:
        insert_avro(self.client, self.table, version, [m.value() for m in msgs], tok, self.insert_settings)

    def _try_insert(self, version: int, msgs: list, tok: str) -> Exception | None:
        """Insert; None if stored, the error if ClickHouse refused the data; StoreError otherwise."""
        try:
            self._insert(version, msgs, tok)
            return None
        except Exception as e:
            if not is_data_error(e):
                raise StoreError(f"insert into {self.table} failed: {short(e)}") from e
            return e

    def _insert_group(self, version: int, msgs: list, tok: str) -> tuple[int, list]:
        """Insert one writer-version group; returns (rows inserted, dead letters)."""
        first_error = self._try_insert(version, msgs, tok)
        if first_error is None:
            return len(msgs), []
        # Bad data somewhere in the group: the codec names the undecodable ones.
        good, dead = [], []
        for m in msgs:
            try:
                self._decoder.decode(m.value())
                good.append(m)
            except codec.CodecError as ce:
                dead.append((m, ce.reason, str(ce)))
        log.warning("ClickHouse refused %d messages of %s (%s); the codec finds %d undecodable",
                    len(msgs), tok, short(first_error), len(dead))
        ok, rejected = self._bisect(version, good, tok + "/checked")
        return ok, dead + rejected

    def _bisect(self, version: int, msgs: list, tok: str) -> tuple[int, list]:
        if not msgs:
            return 0, []
        error = self._try_insert(version, msgs, tok)
        if error is None:
            return len(msgs), []
        if len(msgs) == 1:
            return 0, [(msgs[0], "clickhouse_rejected", short(error))]
        mid = len(msgs) // 2
        a_ok, a_bad = self._bisect(version, msgs[:mid], tok + "/a")
        b_ok, b_bad = self._bisect(version, msgs[mid:], tok + "/b")
        return a_ok + b_ok, a_bad + b_bad


def insert_avro(client, table: str, version: int, values: list[bytes], token: str, settings: dict) -> None:
    """One INSERT ... FORMAT Avro of single-object encoded values, deduplicated by `token`.
    The one insert path of the sink and of `fdpass run`."""
    data = conversion.avro_container(version, values)
    client.raw_insert(table, insert_block=data, fmt="Avro",
                      settings={**settings, "insert_deduplication_token": token})


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
