"""Kafka message bytes -> what ClickHouse inserts; and event dicts -> column lists.

The hot path does not decode Avro in Python (fastavro: ~11 us per event,
90k events/s per core, far from the sink's 300k rows/s target). Two ways
instead, both fed the messages of one writer schema version:

Native (the normal path). The C transcoder fdpass.sinks._avro_to_native
(sinks/avro_to_native.c; its header comment gives the format and the
validation rules) turns the message bodies into one ClickHouse Native block
and lists the messages it rejects, with a reason. Measured on the project's
2-CPU VM: 0.4-0.7 CPU us per event in the transcoder, 1.2-1.4 us in
ClickHouse for the insert, against ~9 us for ClickHouse's own Avro reader.
Its layout comes from the writer schema (codec.SCHEMAS, i.e. the shipped
.avsc files generated from fields.py) and the column types of
schemas/clickhouse.py (`native_fields`), so no field is described twice;
LowCardinality columns are sent dictionary-encoded, as the table stores
them. The block's columns are the writer's fields; the INSERT names them,
so columns a writer version lacks get their defaults and `time`
(MATERIALIZED) is never sent.

Avro (the fallback, when the extension is not built). The bodies of the
messages are wrapped into one Avro object container file and ClickHouse
(C++) decodes them with `INSERT ... FORMAT Avro`, resolving the writer
schema's fields to columns by name (missing ones get their defaults).
Each message becomes its own Avro block (count 1, its own byte length, sync
marker): ~19 bytes per message and ~20 % of ClickHouse's decode speed buy
isolation -- a truncated or garbled body can only fail its own block, never
shift the reader into its neighbours' bytes and turn them into plausible
garbage rows. When ClickHouse rejects a container, the writer finds the bad
messages with the Python codec (see writer.py). Where ClickHouse's Avro
reader is more lenient than the codec (known, measured): bytes left over
after a complete record, and strings that are not UTF-8, are stored where
codec.decode would say corrupt_body. Every field of such a row was read
from its own message; nothing is shifted or invented.

Python only checks each message's 10-byte header here (magic, known
fingerprint): that is what decides the writer schema.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from fdpass.schemas import clickhouse as ddl
from fdpass.schemas import codec
from fdpass.schemas.fields import FIELDS, Field

try:
    from fdpass.sinks import _avro_to_native
except ImportError as e:  # no C compiler at install time: the Avro fallback
    _avro_to_native = None
    NATIVE_MISSING: str | None = str(e)
else:
    NATIVE_MISSING = None

MAGIC = codec.MAGIC
HEADER_LEN = codec.HEADER_LEN
header_version = codec.header_version  # the one header check


# --- Native ----------------------------------------------------------------------
# Avro primitive type -> the logical kind of fields.py (whose ClickHouse type
# schemas/clickhouse.py chooses).
_KIND_OF_AVRO = {"string": "string", "long": "long", "int": "int", "boolean": "bool", "enum": "enum"}


def native_fields(schema: dict) -> list[tuple[str, str, bool, int, str, bool]]:
    """The transcoder's layout of a flat record schema: per field (name, Avro kind, nullable,
    enum symbols, ClickHouse column type, LowCardinality). NotImplementedError for a type it
    cannot carry (codec.flat_fields, which reads the schema for both C modules)."""
    out = []
    for name, kind, nullable, _, _, symbols in codec.flat_fields(schema):
        field = Field(name, _KIND_OF_AVRO[kind], nullable, "")
        out.append((name, kind, nullable, len(symbols or ()), ddl.column_type(field, symbols),
                    ddl.low_cardinality(field)))
    return out


def _make_transcoders() -> tuple[dict, dict[int, str]]:
    """One transcoder per shipped writer version, and why a version has none."""
    made, missing = {}, {}
    for version, schema in codec.SCHEMAS.items():
        if _avro_to_native is None:
            missing[version] = f"the C extension is not importable ({NATIVE_MISSING})"
            continue
        try:
            made[version] = _avro_to_native.Transcoder(MAGIC + codec.FINGERPRINTS[version], native_fields(schema))
        except (NotImplementedError, ValueError) as e:
            missing[version] = str(e)
    return made, missing


_TRANSCODERS, NATIVE_UNSUPPORTED = _make_transcoders()


def native_supported(version: int) -> bool:
    return version in _TRANSCODERS


@dataclass
class Payload:
    """One INSERT's worth of messages of one writer version, as ClickHouse reads it."""

    fmt: str  # "Native" | "Avro"
    data: object  # bytes-like
    columns: tuple[str, ...] | None  # Native: the INSERT's column list
    rows: int  # rows it holds (Avro: every message; ClickHouse decides)
    rejected: list[tuple[int, str, str]]  # (index in values, reason, detail): left out, undecodable
    settings: dict


# Avro: columns a writer version lacks get their defaults instead of failing the file.
_AVRO_SETTINGS = {"input_format_avro_allow_missing_fields": 1}


def payload(version: int, values: list, native: bool = True) -> Payload:
    """The messages (all with writer `version`'s header) as a Native block if `native` and the
    transcoder reads that version, else as an Avro container."""
    t = _TRANSCODERS.get(version) if native else None
    if t is None:
        return Payload("Avro", avro_container(version, values), None, len(values), [], _AVRO_SETTINGS)
    block, rows, rejected = t.transcode(values)
    return Payload("Native", memoryview(block), t.columns, rows, rejected, {})


# --- Avro container (fallback) ------------------------------------------------------
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
