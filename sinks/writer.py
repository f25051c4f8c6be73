"""Inserts one batch of one partition (one INSERT per writer schema) and isolates the rows that cannot be stored.

The protocol around it (record the range, dead letters, done, commit) is
sinks/exactly_once.py; this module only inserts. A batch holds the Kafka
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
from fdpass.schemas import codec
from fdpass.sinks import conversion
from fdpass.sinks.exactly_once import Batch, StoreError, short, token

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
                    "containers (FORMAT Avro), which cost ClickHouse ~4x the CPU per row; reinstall with a C "
                    "compiler present (scripts/setup) for Native blocks", conversion.NATIVE_MISSING)
    else:
        log.info("inserting ClickHouse Native blocks (C transcoder fdpass.sinks._avro_to_native)")
        for version, why in conversion.NATIVE_UNSUPPORTED.items():
            log.warning("writer schema v%d is inserted as Avro containers: %s", version, why)


class Writer:
    def __init__(self, client, database: str, table: str, insert_settings: dict | None = None, native: bool = True):
        self.client = client
        self.table = f"{database}.{table}"
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
    # Messages are named by their index in the batch; a group is a list of
    # indexes, or None for the whole batch (its values list as it is).
    def insert(self, batch: Batch) -> tuple[int, list]:
        """Insert a batch's rows under its tokens: (rows inserted, [(index, reason, detail)] of the
        messages that cannot be stored). StoreError when the store fails (the caller retries)."""
        rows, dead = 0, []
        pending = self._groups(batch, None, dead)
        while pending:
            version, group = pending.pop(0)
            tok = token(batch.topic, batch.partition, batch.first, batch.last, f"/v{version}")
            ok, bad, foreign = self._insert_group(batch, version, group, tok)
            rows += ok
            dead.extend(bad)
            if foreign:  # Native: messages of other writer versions, left out of this version's block
                pending.extend(self._groups(batch, foreign, dead, by_header=True))
        return rows, dead

    def _groups(self, batch: Batch, group: list | None, dead: list, by_header: bool = False) -> list:
        """(writer version, group) to insert, in version order; messages without a usable header
        are added to `dead`.

        Native: one group of every message, for the first message's version
        (the transcoder checks the other headers). By header (Avro, or the
        messages a transcoder left out as foreign): the header check in
        Python, once per message.
        """
        indexes = range(len(batch.values)) if group is None else group
        values = batch.values
        first = None
        for i in indexes:  # normally stops at the first message
            first = conversion.header_version(values[i])
            if isinstance(first, int):
                break
        if not isinstance(first, int):  # no message has a known header
            dead.extend(self._dead_letter(values, i, conversion.header_version(values[i]), "header check failed")
                        for i in indexes)
            return []
        if not by_header and self._native(first):
            return [(first, group)]
        groups: dict[int, list] = {}
        for i in indexes:
            v = conversion.header_version(values[i])
            if not isinstance(v, int):  # the DLQ reason
                dead.append(self._dead_letter(values, i, v, "header check failed"))
            elif v in groups:
                groups[v].append(i)
            else:
                groups[v] = [i]
        return sorted(groups.items())

    def _dead_letter(self, values: list, i: int, reason: str, detail: str) -> tuple:
        """(i, reason, detail): the codec's reason and detail where it rejects the message (the judge),
        else the given ones."""
        try:
            self._decoder.decode(values[i] or b"")
        except codec.CodecError as e:
            return i, e.reason, str(e)
        return i, reason, detail

    def _try_insert(self, batch: Batch, version: int, group: list | None, tok: str) -> tuple[list, Exception | None]:
        """Insert what decodes of a group: (the indexes the transcoder left out with their reasons,
        None if stored or the error if ClickHouse refused the data); StoreError for any other failure."""
        values = batch.values if group is None else [batch.values[i] for i in group]
        p = conversion.payload(version, values, self._native(version))
        rejected = [(j if group is None else group[j], reason, detail) for j, reason, detail in p.rejected]
        if p.rows == 0:
            return rejected, None
        try:
            insert_payload(self.client, self.table, p, tok, self.insert_settings)
        except Exception as e:
            if not is_data_error(e):
                raise StoreError(f"insert into {self.table} failed: {short(e)}") from e
            return rejected, e
        return rejected, None

    def _sort_rejects(self, batch: Batch, version: int, rejected: list) -> tuple[list, list]:
        """Messages the transcoder left out -> (dead letters, indexes of another writer version)."""
        dead, foreign = [], []
        for i, reason, detail in rejected:
            v = conversion.header_version(batch.values[i]) if reason != "corrupt_body" else version
            if isinstance(v, int) and v != version:
                foreign.append(i)
            else:
                dead.append(self._dead_letter(batch.values, i, reason, detail))
        return dead, foreign

    def _insert_group(self, batch: Batch, version: int, group: list | None, tok: str) -> tuple[int, list, list]:
        """Insert one writer-version group: (rows inserted, dead letters, indexes of other versions)."""
        rejected, error = self._try_insert(batch, version, group, tok)
        dead, foreign = self._sort_rejects(batch, version, rejected)
        size = len(batch.values) if group is None else len(group)
        if error is None:
            return size - len(rejected), dead, foreign
        # ClickHouse refused rows of what was sent.
        left_out = {i for i, _, _ in rejected}
        sent = [i for i in (range(size) if group is None else group) if i not in left_out]
        if self._native(version):
            good = sent  # the transcoder left out every message the codec rejects (tests/test_avro_to_native.py)
        else:  # ClickHouse's Avro reader failed on the container: the codec names the undecodable
            good = []
            for i in sent:
                try:
                    self._decoder.decode(batch.values[i])
                    good.append(i)
                except codec.CodecError as ce:
                    dead.append((i, ce.reason, str(ce)))
        log.warning("ClickHouse refused %d rows of %s (%s); bisecting %d", len(sent), tok, short(error), len(good))
        ok, refused = self._bisect(batch, version, good, tok + "/checked")
        return ok, dead + refused, foreign

    def _bisect(self, batch: Batch, version: int, group: list, tok: str) -> tuple[int, list]:
        """Rows ClickHouse refuses, found by halving; every message here decodes."""
        if not group:
            return 0, []
        rejected, error = self._try_insert(batch, version, group, tok)
        # (none: these all went through the same transcoder before)
        dead = [self._dead_letter(batch.values, i, reason, detail) for i, reason, detail in rejected]
        if error is None:
            return len(group) - len(rejected), dead
        if len(group) == 1:
            return 0, [(group[0], "clickhouse_rejected", short(error))]
        mid = len(group) // 2
        a_ok, a_bad = self._bisect(batch, version, group[:mid], tok + "/a")
        b_ok, b_bad = self._bisect(batch, version, group[mid:], tok + "/b")
        return a_ok + b_ok, a_bad + b_bad


def insert_payload(client, table: str, p: conversion.Payload, token: str, settings: dict) -> None:
    """One INSERT of a payload (conversion.payload), deduplicated by `token`."""
    client.raw_insert(table, column_names=p.columns, insert_block=p.data, fmt=p.fmt,
                      settings={**settings, **p.settings, "insert_deduplication_token": token})
