"""Avro single-object encoding of fdpass events: the bytes of every Kafka message.

    C3 01 | CRC-64-AVRO fingerprint of the writer schema (8 bytes, little-endian) | Avro binary body

A message names its own writer schema by fingerprint, so no schema registry is
needed: `decode` looks the fingerprint up among the schema files shipped in
schemas/ (every version ever published stays there) and resolves the body
into the current reader schema, so old messages get the defaults of fields
added since, and readers built before a field was added ignore it (Avro
schema resolution).

API (the collector and the sink code against exactly this):
    encode(event: dict) -> bytes       with the current schema
    decode(data: bytes) -> dict        any shipped writer schema -> current schema
    CodecError(ValueError)             .reason is a short, stable string (DLQ header)
        BadMagic            "bad_magic"
        UnknownFingerprint  "unknown_fingerprint"
        TruncatedMessage    "truncated"
        CorruptBody         "corrupt_body"
    EncodeError(CodecError)            "encode": the event does not fit the schema
Encoder / Decoder let a test or a tool pick another writer or reader version.
"""

from __future__ import annotations

import io
import json
import struct

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import to_parsing_canonical_form

from fdpass.schemas import avro

MAGIC = b"\xc3\x01"
HEADER_LEN = len(MAGIC) + 8


class CodecError(ValueError):
    """A message that cannot be turned into an event (or an event into a message)."""

    reason = "codec_error"


class BadMagic(CodecError):
    reason = "bad_magic"


class UnknownFingerprint(CodecError):
    reason = "unknown_fingerprint"


class TruncatedMessage(CodecError):
    reason = "truncated"


class CorruptBody(CodecError):
    reason = "corrupt_body"


class EncodeError(CodecError):
    reason = "encode"


# --- CRC-64-AVRO (Rabin) fingerprint, as the Avro specification defines it ----
_EMPTY64 = 0xC15D213AA4D7A795


def _fp_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY64 & -(fp & 1))
        table.append(fp)
    return table


_FP_TABLE = _fp_table()


def crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO of `data` as an unsigned 64-bit integer."""
    fp = _EMPTY64
    for byte in data:
        fp = (fp >> 8) ^ _FP_TABLE[(fp ^ byte) & 0xFF]
    return fp


def fingerprint(schema: dict) -> bytes:
    """The 8 fingerprint bytes of a schema as they appear in a message (little-endian)."""
    canonical = to_parsing_canonical_form(parse_schema(schema))
    return struct.pack("<Q", crc64_avro(canonical.encode("utf-8")))


# --- the shipped schemas -----------------------------------------------------
def _load_shipped() -> dict[int, dict]:
    return {version: avro.load_schema_file(version) for version in avro.SCHEMA_FILES}


SCHEMAS: dict[int, dict] = _load_shipped()  # version -> schema (JSON dict)
FINGERPRINTS: dict[int, bytes] = {v: fingerprint(s) for v, s in SCHEMAS.items()}
_VERSION_BY_FP: dict[bytes, int] = {fp: v for v, fp in FINGERPRINTS.items()}
_PARSED: dict[int, dict] = {v: parse_schema(s) for v, s in SCHEMAS.items()}
if len(_VERSION_BY_FP) != len(SCHEMAS):
    raise RuntimeError("two shipped schema files have the same fingerprint: one is a duplicate")


_INT_RANGE = (-(1 << 31), (1 << 31) - 1)
_LONG_RANGE = (-(1 << 63), (1 << 63) - 1)
# Per-field memo of encoded values. Most fields of a host's events repeat
# (host, kernel, comm, namespaces, pids, paths): a dict hit is ~10x cheaper
# than encoding. Unique values (event_id, time_ns) just cycle through.
_MEMO_MAX = 1024


def _varint_loop(z: int) -> bytes:
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def encode_long(n: int) -> bytes:
    """An Avro long (zigzag, then base-128 varint): for writers of Avro framing
    (the sink's object containers); the record encoder has its own fast path."""
    return _varint_loop((n << 1) ^ (n >> 63))


# Big numbers (time_ns, 64-bit inodes and ids) miss the per-field memo every
# time, so their varint must be cheap too. Base-128 is little-endian: the
# first four bytes carry the low 28 bits, each with the continuation bit,
# and the rest is the varint of z >> 28, which changes rarely (for time_ns,
# every ~0.13 s). Two table lookups plus one memo hit replace a 9-step loop.
_LOW14 = [bytes(((i & 0x7F) | 0x80, (i >> 7) | 0x80)) for i in range(1 << 14)]
_HIGH_MEMO: dict[int, bytes] = {}


_SMALL = [_varint_loop(z) for z in range(1 << 14)]  # string lengths, small ints


def _varint(z: int) -> bytes:
    if z < 1 << 14:
        return _SMALL[z]
    if z < 1 << 28:  # two 7-bit groups with continuation bits, then z >> 14 (< 2**14)
        return _LOW14[z & 0x3FFF] + _SMALL[z >> 14]
    high = z >> 28
    tail = _HIGH_MEMO.get(high)
    if tail is None:
        tail = _varint_loop(high)
        if len(_HIGH_MEMO) >= _MEMO_MAX:
            _HIGH_MEMO.clear()
        _HIGH_MEMO[high] = tail
    return _LOW14[z & 0x3FFF] + _LOW14[(z >> 14) & 0x3FFF] + tail


def _integer_writer(kind: str):
    lo, hi = _INT_RANGE if kind == "int" else _LONG_RANGE
    memo: dict = {}

    def write(n) -> bytes:  # called on a memo miss (the caller probes the memo inline)
        if not isinstance(n, int):
            raise TypeError(f"Avro {kind} needs an integer, got {type(n).__name__} {n!r}")
        if not lo <= n <= hi:
            # fastavro would write it and Java readers would then fail on it.
            raise ValueError(f"{n} is out of range for an Avro {kind}")
        out = _varint(((n << 1) ^ (n >> 63)) & 0xFFFFFFFFFFFFFFFF)
        if len(memo) >= _MEMO_MAX:
            memo.clear()
        memo[n] = out
        return out

    write.memo = memo
    return write


def _string_writer():
    memo: dict = {}

    def write(s) -> bytes:  # called on a memo miss (the caller probes the memo inline)
        if not isinstance(s, str):
            raise TypeError(f"Avro string needs a str, got {type(s).__name__} {s!r}")
        raw = s.encode("utf-8")
        out = _varint(len(raw) << 1) + raw
        if len(memo) >= _MEMO_MAX:
            memo.clear()
        memo[s] = out
        return out

    write.memo = memo
    return write


def _enum_writer(schema: dict):
    table = {sym: _varint(i << 1) for i, sym in enumerate(schema["symbols"])}

    def write(sym) -> bytes:
        try:
            return table[sym]
        except (KeyError, TypeError):
            raise ValueError(f"{sym!r} is not a symbol of enum {schema['name']} {list(table)}") from None

    write.memo = table
    return write


def _field_writer(typ):
    if isinstance(typ, dict) and typ.get("type") == "enum":
        return _enum_writer(typ)
    if typ in ("int", "long"):
        return _integer_writer(typ)
    if typ == "string":
        return _string_writer()
    if typ == "boolean":
        return lambda v: b"\x01" if v else b"\x00"  # fastavro's rule: truthiness
    raise NotImplementedError(f"no fast writer for Avro type {typ!r}")


def _unwrap_nullable(field: dict) -> tuple:
    """(T, nullable) of a field typed T or ["null", T]; NotImplementedError for other unions."""
    typ = field["type"]
    if not isinstance(typ, list):
        return typ, False
    if len(typ) != 2 or typ[0] != "null":
        raise NotImplementedError(f"union {typ!r}: only [\"null\", T] is supported")
    return typ[1], True


def compile_record_writer(schema: dict, header: bytes):
    """A function event -> header + Avro body for a flat record schema.

    Same bytes as fastavro's schemaless_writer (a property test checks it),
    about 3x faster: one generated expression joins per-field writers, with
    no per-field type dispatch at run time. Supports the types fdpass events
    use (string, int, long, boolean, enum, and ["null", T] unions); raises
    NotImplementedError for others, so the caller falls back to fastavro.
    """
    env: dict = {"HEADER": header}
    parts = ["HEADER"]
    for i, field in enumerate(schema["fields"]):
        typ, nullable = _unwrap_nullable(field)
        writer = _field_writer(typ)
        env[f"w{i}"] = writer
        if "default" in field:
            env[f"d{i}"] = field["default"]
            get = f"e.get({field['name']!r}, d{i})"
        else:
            get = f"e[{field['name']!r}]"
        if typ == "boolean":
            value = "(b'\\x01' if {v} else b'\\x00')"
        else:
            # The writer's memo (or enum table) is probed inline: a dict.get is
            # far cheaper than a Python call, and encoded values are never b"".
            env[f"m{i}"] = writer.memo
            value = f"(m{i}.get({{v}}) or w{i}(v{i}))"
        if nullable:
            parts.append(f"(b'\\x00' if (v{i} := {get}) is None else b'\\x02' + " + value.format(v=f"v{i}") + ")")
        else:
            parts.append(value.format(v=f"(v{i} := {get})"))
    src = "def write_event(e):\n    return b''.join((\n        " + ",\n        ".join(parts) + ",\n    ))\n"
    exec(compile(src, f"<avro writer {schema.get('name')}>", "exec"), env)
    return env["write_event"]


def flat_fields(schema: dict) -> list[tuple]:
    """A flat record schema as the C modules are configured with it (the collector's
    writer, schemas/avro_writer.c; the sink's transcoder, sinks/avro_to_native.c):
    (name, kind, nullable, has_default, default, enum symbols or None) per field,
    kind one of "string", "int", "long", "boolean", "enum".

    Raises NotImplementedError for a type they do not support.
    """
    out = []
    for field in schema["fields"]:
        typ, nullable = _unwrap_nullable(field)
        if isinstance(typ, dict) and typ.get("type") == "enum":
            kind, symbols = "enum", tuple(typ["symbols"])
        elif typ in ("string", "int", "long", "boolean"):
            kind, symbols = typ, None
        else:
            raise NotImplementedError(f"field {field['name']}: no C support for Avro type {typ!r}")
        out.append((field["name"], kind, nullable, "default" in field, field.get("default"), symbols))
    return out


try:
    from fdpass.schemas._avro_writer import RecordWriter as _NativeRecordWriter
except ImportError:  # built without a C compiler (setup.py): the Python writer does the work
    _NativeRecordWriter = None


class Encoder:
    """Writes events with one shipped schema version.

    Speed matters here (the collector's publish path targets >= 100k events/s
    per core and half of what librdkafka alone can produce). Three writers
    give the same bytes (tests check it), fastest first:
      "c"        schemas/avro_writer.c, configured from the schema (~0.5 us/event)
      "python"   compile_record_writer, generated from the schema (~4.5 us/event),
                 when the C extension was not built
      "fastavro" schemaless_writer, for a schema type neither supports
    `writer` says which one this encoder uses.
    """

    def __init__(self, version: int = avro.CURRENT_VERSION, prefer_c: bool = True):
        self.version = version
        self.schema = _PARSED[version]
        self.header = MAGIC + FINGERPRINTS[version]
        try:
            if prefer_c and _NativeRecordWriter is not None:
                self._write = _NativeRecordWriter(self.header, flat_fields(SCHEMAS[version])).encode
                self.writer = "c"
            else:
                self._write = compile_record_writer(SCHEMAS[version], self.header)
                self.writer = "python"
        except NotImplementedError:
            self._write = self._write_with_fastavro
            self.writer = "fastavro"

    def _write_with_fastavro(self, event: dict) -> bytes:
        buf = io.BytesIO()
        buf.write(self.header)
        schemaless_writer(buf, self.schema, event)
        return buf.getvalue()

    def encode(self, event: dict) -> bytes:
        try:
            return self._write(event)
        except Exception as exc:  # KeyError (missing field), TypeError, ValueError
            raise EncodeError(f"event does not fit schema v{self.version}: {exc!r}") from exc

    def encode_with_fastavro(self, event: dict) -> bytes:
        """The reference encoding (tests compare the fast writer against it)."""
        return self._write_with_fastavro(event)


def _int_fields(schema: dict) -> tuple[str, ...]:
    """Names of the fields of Avro type int (plain or in a union with null)."""
    out = []
    for field in schema["fields"]:
        typ = field["type"]
        if typ == "int" or (isinstance(typ, list) and "int" in typ):
            out.append(field["name"])
    return tuple(out)


def header_version(data: bytes | None) -> int | str:
    """The one header check (C3 01, then a shipped schema's fingerprint): the
    writer schema version of a message, or the reason it has none, as the DLQ
    names it: "truncated", "bad_magic" or "unknown_fingerprint". The C
    transcoder (sinks/avro_to_native.c) makes the same checks in the same order."""
    if data is None or len(data) < len(MAGIC):
        return "truncated"
    if data[:2] != MAGIC:
        return "bad_magic"
    if len(data) < HEADER_LEN:
        return "truncated"
    v = _VERSION_BY_FP.get(bytes(data[2:HEADER_LEN]))
    return "unknown_fingerprint" if v is None else v


class Decoder:
    """Reads any shipped writer version into one reader version.

    Stricter than fastavro in one way: an Avro int must fit 32 bits (fastavro
    reads an int like a long and would hand a 33-bit number to a ClickHouse
    Int32 column). Such a body is CorruptBody.
    """

    def __init__(self, reader_version: int = avro.CURRENT_VERSION):
        self.reader_version = reader_version
        self.reader = _PARSED[reader_version]
        self._int_fields = {v: _int_fields(s) for v, s in SCHEMAS.items()}

    def writer_version(self, data: bytes) -> int:
        """The shipped schema version a message was written with (header checks only)."""
        version = header_version(data)
        if version == "truncated":
            need = "the 2-byte magic" if len(data) < len(MAGIC) else f"the {HEADER_LEN}-byte header"
            raise TruncatedMessage(f"message of {len(data)} bytes is shorter than {need}")
        if version == "bad_magic":
            raise BadMagic(f"message starts with {bytes(data[:2]).hex()}, not c301 (Avro single-object encoding)")
        if version == "unknown_fingerprint":
            raise UnknownFingerprint(
                f"writer schema fingerprint {bytes(data[2:HEADER_LEN]).hex()} is not among the shipped schemas "
                f"({', '.join(f'v{v}={f.hex()}' for v, f in FINGERPRINTS.items())}): "
                "a newer fdpass wrote it, or it is not an fdpass event"
            )
        return version

    def decode(self, data: bytes) -> dict:
        version = self.writer_version(data)
        body = io.BytesIO(data)
        body.seek(HEADER_LEN)
        # Same writer and reader: skip schema resolution (faster, same result).
        reader = None if version == self.reader_version else self.reader
        try:
            event = schemaless_reader(body, _PARSED[version], reader)
        except (EOFError, StopIteration) as exc:
            raise TruncatedMessage(f"body ends early for schema v{version} ({len(data)} bytes)") from exc
        except IndexError as exc:
            # fastavro raises IndexError, not EOFError, for a varint cut short after
            # its first byte: the body is used up and ends in 1-9 bytes that each say
            # more follows (10 or more: an over-long varint, i.e. garbage). A bad enum
            # or union index is an IndexError too, of a complete varint.
            run = 0
            while run < 10 and HEADER_LEN + run < len(data) and data[-1 - run] & 0x80:
                run += 1
            if body.tell() >= len(data) and 0 < run < 10:
                raise TruncatedMessage(f"body ends inside a number for schema v{version} ({len(data)} bytes)") from exc
            raise CorruptBody(f"body does not decode with schema v{version}: {exc!r}") from exc
        except Exception as exc:  # bad enum/union index, bad UTF-8, absurd lengths...
            raise CorruptBody(f"body does not decode with schema v{version}: {exc!r}") from exc
        if body.tell() < len(data):
            raise CorruptBody(f"{len(data) - body.tell()} bytes left over after the schema v{version} body")
        if body.tell() > len(data):  # a length field pointed past the end
            raise TruncatedMessage(f"body ends early for schema v{version} ({len(data)} bytes)")
        lo, hi = _INT_RANGE
        for name in self._int_fields[version]:
            n = event.get(name)
            if n is not None and not lo <= n <= hi:
                raise CorruptBody(f"field {name} of schema v{version} is an Avro int but holds {n}, beyond 32 bits")
        return event


_ENCODER = Encoder()
_DECODER = Decoder()


def encode(event: dict, _write=_ENCODER._write) -> bytes:
    """One event -> one single-object-encoded message, current schema.

    Raises EncodeError when the event does not fit the schema.
    """
    # Calls the generated writer directly: this is the collector's hot path.
    try:
        return _write(event)
    except Exception:
        return _ENCODER.encode(event)  # raises the EncodeError with the reason


# encode() without its error wrapping, for the collector's publish loop: the
# same bytes, but an event that does not fit raises the writer's own KeyError,
# TypeError or ValueError; such a caller then calls encode() for the EncodeError.
encode_unchecked = _ENCODER._write


def decode(data: bytes) -> dict:
    """One message (any shipped writer schema) -> one event in the current schema.

    Raises a CodecError subclass, never anything else, for bad input.
    """
    return _DECODER.decode(data)


if __name__ == "__main__":  # print the fingerprints of the shipped schemas
    for v, fp in FINGERPRINTS.items():
        print(f"v{v} {avro.SCHEMA_FILES[v]} {fp.hex()}")
    print(json.dumps({"current": avro.CURRENT_VERSION}))
