"""Kafka message bytes -> what ClickHouse inserts; and event dicts -> column lists.

The hot path does not decode Avro in Python. Decoding one event with
fastavro costs ~11 us (90k events/s per core), which alone would miss the
sink's 300k rows/s target. Instead, the bodies of all messages written with
the same schema version are wrapped into one Avro object container file and
ClickHouse (C++) decodes them with `INSERT ... FORMAT Avro`, resolving the
writer schema's fields to columns by name: columns a writer version lacks
get their defaults, which is exactly Avro schema evolution.

Each message becomes its own Avro block (count 1, its own byte length, sync
marker). That costs ~19 bytes per message and ~20 % of ClickHouse's decode
speed, and buys isolation: a truncated or garbled body can only fail its own
block; it can never shift the reader into its neighbours' bytes and turn
them into plausible garbage rows (which a single block of concatenated
bodies can). When ClickHouse rejects a container, the writer finds the bad
messages with the Python codec (fdpass.schemas.codec), which is then the
judge of what is undecodable (see writer.py).

Python only checks each message's 10-byte header here (magic, known
fingerprint): that is what decides the writer schema.

Where ClickHouse is more lenient than the codec (known, measured): bytes
left over after a complete record, and strings that are not UTF-8, are
stored (ClickHouse's String is bytes; its Avro reader stops at the end of
the record) where codec.decode would say corrupt_body. Every field of such a
row was read from its own message; nothing is shifted or invented.
"""

from __future__ import annotations

import json
import os

from fdpass.schemas import codec
from fdpass.schemas.fields import FIELDS

MAGIC = codec.MAGIC
HEADER_LEN = codec.HEADER_LEN
# fingerprint bytes -> schema version, for the header check
VERSION_BY_FP: dict[bytes, int] = {fp: v for v, fp in codec.FINGERPRINTS.items()}


def header_version(value: bytes | None) -> int | str:
    """The writer schema version of a message, or the DLQ reason why it has none."""
    if value is None or len(value) < HEADER_LEN:
        return "truncated"
    if value[:2] != MAGIC:
        return "bad_magic"
    v = VERSION_BY_FP.get(value[2:HEADER_LEN])
    return "unknown_fingerprint" if v is None else v


_zigzag_varint = codec.encode_long


# Block prefix (object count 1, byte length L) for every body length we are
# likely to see, precomputed: this runs once per message.
_PREFIX = [_zigzag_varint(1) + _zigzag_varint(n) for n in range(4096)]


def _prefix(n: int) -> bytes:
    return _PREFIX[n] if n < 4096 else _zigzag_varint(1) + _zigzag_varint(n)


_HEADERS: dict[int, tuple[bytes, bytes]] = {}


def _container_header(version: int) -> tuple[bytes, bytes]:
    """Avro object container header for a writer version, and its sync marker."""
    try:
        return _HEADERS[version]
    except KeyError:
        pass
    sync = os.urandom(16)
    meta = {"avro.schema": json.dumps(codec.SCHEMAS[version]).encode(), "avro.codec": b"null"}
    out = bytearray(b"Obj\x01")
    out += _zigzag_varint(len(meta))
    for k, v in meta.items():
        out += _zigzag_varint(len(k)) + k.encode() + _zigzag_varint(len(v)) + v
    out += _zigzag_varint(0) + sync
    _HEADERS[version] = (bytes(out), sync)
    return _HEADERS[version]


def avro_container(version: int, values: list[bytes]) -> bytes:
    """One Avro object container holding each message's body as its own block."""
    header, sync = _container_header(version)
    parts = [header]
    append = parts.append
    for value in values:
        body = value[HEADER_LEN:]
        append(_prefix(len(body)))
        append(body)
        append(sync)
    return b"".join(parts)


def events_to_columns(events: list[dict], names: tuple[str, ...] = tuple(f.name for f in FIELDS)) -> list[list]:
    """Event dicts (codec.decode output) -> one list per column, for client.insert(column_oriented=True).

    Fields an event lacks (an older writer) become None; use only with
    events of the current schema or columns that accept NULL.
    """
    return [[e.get(name) for e in events] for name in names]
