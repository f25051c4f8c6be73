"""Kernel records -> Avro messages (the `run` and `collect --kafka` outputs)
or JSON lines (`collect --jsonl`), a batch at a time.

Two encoders give the same bytes (tests/test_batch_encode.py checks it on
generated records): the C one (collector/capture.c, EventEncoder), which
writes each event straight from the record and takes the fields shared by
one task's events (host .. peer_sock_ino: /proc lookups, string decoding)
from the Python Enricher once per task, and the Python one, which builds the
contract event dict (Enricher.event) and encodes it (codec.encode, json.dumps)."""

from __future__ import annotations

import json
import logging

from fdpass.collector import records as R
from fdpass.collector.enrich import Enricher
from fdpass.schemas import avro, codec

log = logging.getLogger("fdpass.collect")

try:
    from fdpass.collector import _capture
except ImportError:  # built without a C compiler (setup.py)
    _capture = None

# The message layout capture.c writes: event_id, time_ns, the task part
# (written by Python, any flat fields), then these, exactly.
HEAD = (("event_id", "string", False), ("time_ns", "long", False))
TASK_FIRST, TASK_LAST = "host", "peer_sock_ino"
TAIL = (
    ("fd", "int", False), ("fd_index", "int", False), ("fd_count", "int", False),
    ("file_path", "string", False), ("file_ino", "long", False), ("file_dev", "long", False),
    ("file_type", "enum", False), ("file_flags", "int", False), ("ret", "long", False),
    ("probe", "string", False), ("msg_index", "int", False), ("seq", "long", False),
    ("path_truncated", "boolean", False), ("fds_truncated", "boolean", False), ("msg_ctrunc", "boolean", False),
    ("abi", "enum", False), ("file_verified", "boolean", False), ("transfer_id", "long", True),
)
# capture.c's file type codes, in its order (FT_* there).
FILE_TYPES = ("REGULAR", "DIRECTORY", "CHAR", "BLOCK", "FIFO", "SOCKET", "SYMLINK", "ANON", "UNKNOWN")


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def native_encoder(enricher: Enricher, version: int = avro.CURRENT_VERSION, jsonl: bool = False):
    """A C EventEncoder (Avro messages of this schema version, or JSON lines),
    or None (not built, or a schema whose layout capture.c does not write:
    the Python path then runs)."""
    if _capture is None:
        return None
    schema = codec.SCHEMAS[version]
    fields = codec.flat_fields(schema)
    names = [f[0] for f in fields]
    try:
        first, last = names.index(TASK_FIRST), names.index(TASK_LAST)
    except ValueError:
        return None
    shape = [(f[0], f[1], f[2]) for f in fields]
    if tuple(shape[:first]) != HEAD or tuple(shape[last + 1:]) != TAIL:
        log.warning("schema v%d is not the layout the C encoder writes: events take the Python path", version)
        return None
    symbols = {f[0]: f[5] for f in fields}
    file_types = bytes(symbols["file_type"].index(t) for t in FILE_TYPES)
    abis = bytes(symbols["abi"].index(R.ABIS.get(code, "X86_64")) for code in range(4))
    task_schema = {"type": "record", "name": "task_part", "fields": schema["fields"][first:last + 1]}
    if jsonl:
        keys = names[first:last + 1]

        def write_task(part: dict) -> bytes:  # '"host":"vm",...,"peer_sock_ino":N': the braces come from C
            return _dumps({k: part[k] for k in keys})[1:-1].encode()
    else:
        write_task = codec.compile_record_writer(task_schema, b"")

    def task_part(raw: bytes) -> bytes:
        rec, _ = R.decode_bytes(raw)
        return write_task(enricher._task_part(rec))

    prefix = f"{enricher.host.host_id}:{enricher.host.boot_id}:"
    return _capture.EventEncoder(codec.Encoder(version).header, prefix, task_part, file_types, abis, jsonl)


class BatchEncoder:
    """records -> (values, n_send, n_recv, others); `others` are the
    records left to the per-record Python path of the caller (loss records,
    undecodable ones, events that do not fit the schema)."""

    def __init__(self, enricher: Enricher, prefer_c: bool = True, jsonl: bool = False):
        self.enricher = enricher
        self.jsonl = jsonl
        self.native = native_encoder(enricher, jsonl=jsonl) if prefer_c else None
        self.kind = "c" if self.native is not None else "python"

    def encode(self, records: list[bytes]):
        enricher = self.enricher
        if self.native is not None:
            if enricher.expire():  # the Python task parts expired: so do the C copies
                self.native.clear()
            return self.native.encode(records, enricher.clock.to_wall(0))
        values, others = [], []
        n_recv = 0
        decode, event = R.decode_bytes, enricher.event
        encode = (lambda e: (_dumps(e) + "\n").encode()) if self.jsonl else codec.encode
        for raw in records:
            try:
                rec, path = decode(raw)
            except ValueError:
                others.append(raw)
                continue
            if rec.kind == R.KIND_LOSS:
                others.append(raw)
                continue
            try:
                e = event(rec, path)  # ValueError: a field the decoder cannot name (enrich.py)
                value = encode(e)
            except (ValueError, codec.EncodeError):
                others.append(raw)
                continue
            values.append(value)
            n_recv += e["direction"] == "RECV"
        return values, len(values) - n_recv, n_recv, others
