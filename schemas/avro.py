"""The Avro schema of an fdpass event, generated from schemas/fields.FIELDS.

fields.py is the one source of truth; this module only maps its logical kinds
to Avro types. The shipped schema files are what readers resolve fingerprints
against, so they are frozen versions:

  fdpass_event.v1.avsc  the original contract (every field up to `probe`; README, "The event")
  fdpass_event.v2.avsc  + msg_index, seq, path_truncated, fds_truncated, msg_ctrunc
  fdpass_event.v3.avsc  + abi, file_verified, transfer_id; syscall gains the
                        IO_URING_* symbols (current: all of FIELDS)

tests/test_codec.py checks that the current .avsc equals `event_schema()`, so
a change to FIELDS without a new schema file fails the tests instead of
silently producing messages no shipped schema can read. To add a field:
append it to FIELDS (with a default, i.e. after `probe`; an enum names its
default symbol with Field(default=...)), write the next version's file with
`python -m fdpass.schemas.avro > schemas/fdpass_event.vN.avsc`, add it to
SCHEMA_FILES and move CURRENT_VERSION. Enum symbols are only appended. Never
edit a shipped file (tests/test_codec.py checks each is an earlier state of
FIELDS).
"""

from __future__ import annotations

import json
from pathlib import Path

from fdpass.schemas.fields import ENUMS, FIELDS, Field

NAMESPACE = "io.fdpass"
RECORD_NAME = "Event"
SCHEMA_DIR = Path(__file__).resolve().parent
# version -> file name. Order matters only for readability.
SCHEMA_FILES = {1: "fdpass_event.v1.avsc", 2: "fdpass_event.v2.avsc", 3: "fdpass_event.v3.avsc"}
CURRENT_VERSION = 3
# The original contract (README, "The event") ends at this field; every later field is
# an addition and must carry a default so v1 messages stay readable.
LAST_V1_FIELD = "probe"

_PRIMITIVE = {"string": "string", "long": "long", "int": "int", "bool": "boolean"}
# Avro enum type names (CamelCase, as Avro named types usually are).
_ENUM_TYPE_NAMES = {"direction": "Direction", "syscall": "Syscall", "file_type": "FileType", "abi": "Abi"}
# Default of a non-nullable added field, by kind.
_ZERO = {"string": "", "long": 0, "int": 0, "bool": False}


def _avro_type(field: Field):
    if field.kind == "enum":
        return {"type": "enum", "name": _ENUM_TYPE_NAMES[field.name], "symbols": list(ENUMS[field.name])}
    try:
        return _PRIMITIVE[field.kind]
    except KeyError:
        raise ValueError(f"field {field.name!r}: no Avro type for kind {field.kind!r}") from None


def default_value(field: Field):
    """The value a message or row without `field` reads as: null for a nullable
    field, else the field's explicit default, else its kind's zero. An enum has
    no zero: an added enum field must name its default symbol (ValueError)."""
    if field.nullable:
        return None
    if field.default is not None:
        if field.kind == "enum" and field.default not in ENUMS[field.name]:
            raise ValueError(f"field {field.name!r}: default {field.default!r} is not one of its symbols")
        return field.default
    if field.kind == "enum":
        raise ValueError(f"field {field.name!r}: an added enum field needs an explicit default")
    return _ZERO[field.kind]


def _avro_field(field: Field, defaulted: bool) -> dict:
    typ = _avro_type(field)
    out: dict = {"name": field.name}
    if field.nullable:
        # "null" first: Avro requires a union's default to match its first branch.
        out["type"] = ["null", typ]
        out["default"] = None
    else:
        out["type"] = typ
        if defaulted:  # an enum's default is its symbol, as Avro writes enum defaults
            out["default"] = default_value(field)
    out["doc"] = field.doc
    return out


def event_schema(fields: tuple[Field, ...] = FIELDS) -> dict:
    """The Avro record schema (as JSON-able dict) for `fields`."""
    names = [f.name for f in fields]
    cut = names.index(LAST_V1_FIELD) if LAST_V1_FIELD in names else len(names) - 1
    return {
        "type": "record",
        "name": RECORD_NAME,
        "namespace": NAMESPACE,
        "doc": "One file descriptor passed over a unix socket (SCM_RIGHTS), seen by fdpass on one side of the transfer.",
        "fields": [_avro_field(f, defaulted=i > cut) for i, f in enumerate(fields)],
    }


def v1_fields() -> tuple[Field, ...]:
    """The original contract: FIELDS up to and including `probe`."""
    names = [f.name for f in FIELDS]
    return FIELDS[: names.index(LAST_V1_FIELD) + 1]


def render(schema: dict) -> str:
    """The text of a shipped .avsc file (stable formatting, so files can be compared)."""
    return json.dumps(schema, indent=2) + "\n"


def load_schema_file(version: int) -> dict:
    return json.loads((SCHEMA_DIR / SCHEMA_FILES[version]).read_text())


def current_schema() -> dict:
    return load_schema_file(CURRENT_VERSION)


if __name__ == "__main__":  # python -m fdpass.schemas.avro > schemas/fdpass_event.vN.avsc
    # Only the current FIELDS can be rendered: earlier versions had fewer enum
    # symbols, and their shipped files are the record of them.
    print(render(event_schema(FIELDS)), end="")
