"""The C transcoder (sinks/avro_to_native.c): Avro single-object messages -> a ClickHouse Native block.

The Python codec (fastavro underneath) is the judge of what decodes. The
Native blocks are read back here by an independent decoder of the format
(`read_native`), and once through a real embedded ClickHouse (chDB).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fdpass.schemas import avro, codec
from fdpass.schemas import clickhouse as ddl
from fdpass.schemas.fields import ENUMS, FIELDS
from fdpass.schemas.synthetic import make_event
from fdpass.sinks import conversion

# The rules on which the transcoder is stricter than fastavro: when the codec
# accepts a message the transcoder rejects, the detail must name one of them
# (avro_to_native.c's header comment).
CURRENT = avro.CURRENT_VERSION

STRICTER = re.compile(r"over-long varint|boolean byte 0x[0-9a-f]{2} is neither|enum index -\d+ |union index -\d+ ")


def test_the_extension_is_built_and_reads_every_shipped_schema():
    """A silently missing extension would put the sink on the slow Avro path: fail instead."""
    from fdpass.sinks import _avro_to_native  # noqa: F401 - importable, not skipped

    assert conversion.NATIVE_MISSING is None
    assert conversion.NATIVE_UNSUPPORTED == {}
    assert all(conversion.native_supported(v) for v in codec.SCHEMAS)


# --- an independent reader of Native blocks --------------------------------------
def _varuint(buf: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return n, pos


def _enum_values(typ: str) -> dict[int, str]:
    return {int(v): k for k, v in re.findall(r"'([^']*)' = (-?\d+)", typ)}


def _u64(buf: bytes, pos: int) -> tuple[int, int]:
    return int.from_bytes(buf[pos:pos + 8], "little"), pos + 8


def _read_low_cardinality(block: bytes, pos: int, typ: str, nrows: int) -> tuple[list, int]:
    """A LowCardinality(String) or LowCardinality(Nullable(String)) column: version, flags, keys, rows, indexes."""
    nullable = typ == "LowCardinality(Nullable(String))"
    assert nullable or typ == "LowCardinality(String)", typ
    version, pos = _u64(block, pos)
    flags, pos = _u64(block, pos)
    assert version == 1 and flags & 0xFF00 == 0x0600, (version, hex(flags))  # additional keys, update dictionary
    width = {0: 1, 1: 2, 2: 4, 3: 8}[flags & 0xFF]
    nkeys, pos = _u64(block, pos)
    keys = []
    for _ in range(nkeys):
        n, pos = _varuint(block, pos)
        keys.append(block[pos:pos + n].decode("utf-8"))
        pos += n
    # ClickHouse's layout: the default first, after a NULL placeholder in a Nullable dictionary
    assert keys[:2 if nullable else 1] == [""] * (2 if nullable else 1)
    assert len(set(keys[2 if nullable else 1:])) == len(keys) - (2 if nullable else 1), "a key twice"
    rows, pos = _u64(block, pos)
    assert rows == nrows
    assert width == (1 if nkeys <= 256 else 2 if nkeys <= 65536 else 4)
    values = []
    for _ in range(nrows):
        k = int.from_bytes(block[pos:pos + width], "little")
        pos += width
        values.append(None if nullable and k == 0 else keys[k])
    return values, pos


def read_native(block: bytes, types: dict | None = None) -> list[dict]:
    """Rows of one Native block (the types the transcoder writes), as codec.decode would give them;
    `types` gets each column's type."""
    block = bytes(block)
    if not block:
        return []
    ncols, pos = _varuint(block, 0)
    nrows, pos = _varuint(block, pos)
    columns = {}
    for _ in range(ncols):
        n, pos = _varuint(block, pos)
        name = block[pos:pos + n].decode()
        pos += n
        n, pos = _varuint(block, pos)
        typ = block[pos:pos + n].decode()
        pos += n
        if types is not None:
            types[name] = typ
        if typ.startswith("LowCardinality("):
            columns[name], pos = _read_low_cardinality(block, pos, typ, nrows)
            continue
        nulls = None
        if typ.startswith("Nullable("):
            nulls = block[pos:pos + nrows]
            pos += nrows
            typ = typ[len("Nullable("):-1]
        values = []
        for _ in range(nrows):
            if typ == "String":
                n, pos = _varuint(block, pos)
                values.append(block[pos:pos + n].decode("utf-8"))
                pos += n
            elif typ in ("Int32", "Int64"):
                w = 4 if typ == "Int32" else 8
                values.append(int.from_bytes(block[pos:pos + w], "little", signed=True))
                pos += w
            elif typ == "Bool":
                assert block[pos] in (0, 1)
                values.append(bool(block[pos]))
                pos += 1
            elif typ.startswith("Enum8("):
                values.append(_enum_values(typ)[int.from_bytes(block[pos:pos + 1], "little", signed=True)])
                pos += 1
            else:
                raise AssertionError(f"unexpected type {typ}")
        if nulls is not None:
            assert set(nulls) <= {0, 1}
            values = [None if null else v for null, v in zip(nulls, values)]
        columns[name] = values
    assert pos == len(block), "bytes after the last column"
    return [{name: vals[i] for name, vals in columns.items()} for i in range(nrows)]


def transcode(version: int, values: list) -> tuple[list[dict], list]:
    p = conversion.payload(version, values)
    assert p.fmt == "Native"
    rows = read_native(p.data)
    assert len(rows) == p.rows == len(values) - len(p.rejected)
    return rows, p.rejected


def writer_fields(version: int) -> list[str]:
    return [f["name"] for f in codec.SCHEMAS[version]["fields"]]


def expected(version: int, msg: bytes) -> dict:
    """What the row of a message must hold: codec.decode's values of the writer's fields."""
    event = codec.decode(msg)
    return {k: event[k] for k in writer_fields(version)}


# --- round trips -------------------------------------------------------------------
def writer_symbols(version: int) -> dict[str, list[str]]:
    """The enum symbols of a writer version, by field (older versions have fewer)."""
    return {f["name"]: f["type"]["symbols"] for f in codec.SCHEMAS[version]["fields"]
            if isinstance(f["type"], dict) and f["type"]["type"] == "enum"}


def fit(version: int, event: dict) -> dict:
    """`event` with each enum value mapped onto a symbol writer `version` has."""
    out = dict(event)
    for name, symbols in writer_symbols(version).items():
        if out[name] not in symbols:
            out[name] = symbols[ENUMS[name].index(out[name]) % len(symbols)]
    return out


def _covering_events(version: int = CURRENT) -> list[dict]:
    """Every enum symbol (of writer `version`), NULL and not for every nullable field, the
    integer extremes, odd strings."""
    out = []
    enums = writer_symbols(version)
    n = max(len(s) for s in enums.values())
    for i in range(max(n, 4)):
        e = make_event(i)
        for name, symbols in ENUMS.items():
            e[name] = enums.get(name, symbols)[i % len(enums.get(name, symbols))]
        for f in FIELDS:
            if f.nullable and i % 2:
                e[f.name] = None
            elif f.kind == "int":
                e[f.name] = (-(2**31), 2**31 - 1, 0, -1)[i % 4]
            elif f.kind == "long":
                e[f.name] = (-(2**63), 2**63 - 1, 0, -1)[i % 4]
            elif f.kind == "bool":
                e[f.name] = bool(i % 2)
            elif f.kind == "string" and f.name != "event_id":
                e[f.name] = ("", "é/日本/\U0001f600", "x" * 300, "nul\x00byte")[i % 4]
        e["event_id"] = f"id-{i}"
        out.append(e)
    return out


@pytest.mark.parametrize("version", sorted(codec.SCHEMAS))
def test_every_field_symbol_and_null_round_trips(version):
    enc = codec.Encoder(version)
    msgs = [enc.encode(e) for e in _covering_events(version)]
    rows, rejected = transcode(version, msgs)
    assert rejected == []
    assert rows == [expected(version, m) for m in msgs]
    assert list(rows[0]) == writer_fields(version)  # the writer's columns, in order, nothing else


def test_block_types_are_the_tables():
    types = {}
    read_native(conversion.payload(CURRENT, [codec.encode(make_event(1))]).data, types)
    assert types == {f.name: ddl.column_type(f) for f in FIELDS}


def test_dictionaries_of_many_values_widen_their_keys():
    """LowCardinality keys are UInt8 up to 256 dictionary entries, then UInt16, then UInt32."""
    for n in (250, 300, 70000):
        msgs = [codec.encode(make_event(i) | {"comm": f"c{i}", "exe": None if i % 3 else f"/x/{i % 257}"})
                for i in range(n)]
        rows, rejected = transcode(CURRENT, msgs)
        assert rejected == [] and rows == [expected(CURRENT, m) for m in msgs]


@pytest.mark.parametrize("native", [True, False], ids=["native", "avro-fallback"])
def test_chdb_reads_the_block_with_defaults_for_what_older_writers_lack(open_store, native):
    """Through real ClickHouse: every value lands as codec.decode reads it, v1 and v2 messages get
    the defaults (a v2 message: abi X86_64, file_verified false, transfer_id NULL)."""
    client = open_store().client()
    ddl.ensure_schema(client)
    from tests.fixtures_clickhouse import insert_messages

    msgs = []
    for v in sorted(codec.SCHEMAS):
        # v3 keys in an older writer's events are not written: its rows take the defaults
        extra = {} if v == CURRENT else {"abi": "X32", "file_verified": True, "transfer_id": 5}
        batch = [codec.Encoder(v).encode(e | extra | {"event_id": f"v{v}-{e['event_id']}"})
                 for e in _covering_events(v)]
        assert insert_messages(client, "fdpass.events", v, batch, f"test/v{v}", native=native) == []
        msgs += batch
    names = [f.name for f in FIELDS]
    got = {r[0]: dict(zip(names, r)) for r in client.query(f"SELECT {', '.join(names)} FROM fdpass.events").result_rows}
    assert len(got) == len(msgs)
    for m in msgs:
        want = codec.decode(m)  # the current reader: older messages carry the defaults
        assert got[want["event_id"]] == want
    old = [r for k, r in got.items() if not k.startswith(f"v{CURRENT}-")]
    assert old and {(r["abi"], r["file_verified"], r["transfer_id"]) for r in old} == {("X86_64", False, None)}


def test_a_batch_of_mixed_messages_keeps_only_the_good_rows_in_order():
    good = [codec.encode(make_event(i)) for i in range(6)]
    v1 = codec.Encoder(1).encode(make_event(9))
    batch = [good[0], b"", None, good[1], b"garbage", good[2][:30], v1, good[3],
             good[4] + b"\x00", codec.MAGIC + bytes(8) + good[5][10:], good[5]]
    rows, rejected = transcode(CURRENT, batch)
    assert [r["event_id"] for r in rows] == [make_event(i)["event_id"] for i in (0, 1, 3, 5)]
    assert [(i, reason) for i, reason, _ in rejected] == [
        (1, "truncated"), (2, "truncated"), (4, "bad_magic"), (5, "truncated"), (6, "unknown_fingerprint"),
        (8, "corrupt_body"), (9, "unknown_fingerprint")]
    assert all(detail for _, _, detail in rejected)


def test_a_rejected_message_leaves_no_byte_in_the_block():
    """Not in a column, not in a LowCardinality dictionary: its values were read before the reject."""
    bad = codec.encode(make_event(1) | {"comm": "comm-of-a-bad-one", "file_path": "/path/of/a/bad/one"}) + b"\x00"
    good = [codec.encode(make_event(i)) for i in range(3)]
    p = conversion.payload(CURRENT, [good[0], bad, good[1], bad, good[2]])
    assert [(i, r) for i, r, _ in p.rejected] == [(1, "corrupt_body"), (3, "corrupt_body")]
    block = bytes(p.data)
    assert b"comm-of-a-bad-one" not in block and b"/path/of/a/bad/one" not in block
    assert block == bytes(conversion.payload(CURRENT, good).data)


def test_no_message_accepted_is_an_empty_block():
    p = conversion.payload(CURRENT, [b"", b"xx"])
    assert (p.rows, len(p.data), [r for _, r, _ in p.rejected]) == (0, 0, ["truncated", "bad_magic"])
    assert conversion.payload(CURRENT, []).rows == 0


def test_values_that_are_not_bytes_are_a_type_error():
    with pytest.raises(TypeError, match="not bytes"):
        conversion.payload(CURRENT, [codec.encode(make_event(0)), "a str"])


# --- hand-made bodies: each validation rule ------------------------------------------
def _varint(z: int) -> bytes:
    return codec._varint_loop(z)


def _zz(n: int) -> bytes:
    return codec.encode_long(n)


def _encode_value(typ, v) -> bytes:
    if isinstance(typ, list):
        return b"\x00" if v is None else b"\x02" + _encode_value(typ[1], v)
    if isinstance(typ, dict):
        return _zz(typ["symbols"].index(v))
    if typ in ("int", "long"):
        return _zz(v)
    if typ == "boolean":
        return b"\x01" if v else b"\x00"
    raw = v.encode()
    return _zz(len(raw)) + raw


def body(event: dict, raw: dict[str, bytes] | None = None, version: int = CURRENT) -> bytes:
    """A message with the fields of `raw` replaced by the given bytes (the rest encoded normally)."""
    raw = raw or {}
    out = codec.MAGIC + codec.FINGERPRINTS[version]
    for f in codec.SCHEMAS[version]["fields"]:
        out += raw[f["name"]] if f["name"] in raw else _encode_value(f["type"], event[f["name"]])
    return out


EV = make_event(3) | {"exe": "/bin/x", "peer_sock_ino": 5}


def test_the_hand_encoder_is_the_codecs():
    assert body(EV) == codec.encode(EV)


@pytest.mark.parametrize("raw,reason,detail,codec_accepts", [
    ({"pid": b"\x80" * 10 + b"\x00"}, "corrupt_body", "field pid: over-long varint", True),
    ({"time_ns": b"\xff" * 9 + b"\x7f"}, "corrupt_body", "field time_ns: over-long varint", True),
    ({"path_truncated": b"\x02"}, "corrupt_body", "field path_truncated: boolean byte 0x02 is neither", True),
    ({"direction": _zz(-1)}, "corrupt_body", "field direction: enum index -1 out of range", True),
    ({"exe": _zz(-1) + _zz(1) + b"x"}, "corrupt_body", "field exe: union index -1 is neither", True),
    ({"direction": _zz(2)}, "corrupt_body", "field direction: enum index 2 out of range 0..1", False),
    ({"abi": _zz(3)}, "corrupt_body", "field abi: enum index 3 out of range 0..2", False),
    ({"transfer_id": _zz(2)}, "corrupt_body", "field transfer_id: union index 2", False),
    ({"exe": _zz(2)}, "corrupt_body", "field exe: union index 2", False),
    ({"pid": _zz(2**31)}, "corrupt_body", "field pid: int 2147483648 beyond 32 bits", False),
    ({"fd": _zz(-(2**31) - 1)}, "corrupt_body", "beyond 32 bits", False),
    ({"comm": _zz(-1) + b"ab"}, "corrupt_body", "field comm: negative string length -1", False),
    ({"comm": _zz(1) + b"\xc0"}, "corrupt_body", "invalid UTF-8", False),
    ({"comm": _zz(2) + b"\xc0\x80"}, "corrupt_body", "invalid UTF-8", False),  # overlong NUL
    ({"comm": _zz(3) + b"\xed\xa0\x80"}, "corrupt_body", "invalid UTF-8", False),  # a surrogate
    ({"comm": _zz(4) + b"\xf4\x90\x80\x80"}, "corrupt_body", "invalid UTF-8", False),  # above U+10FFFF
    ({"comm": _zz(3) + b"a\xe6\x97"}, "corrupt_body", "invalid UTF-8 at byte 1", False),  # cut sequence
])
def test_each_rule(raw, reason, detail, codec_accepts):
    msg = body(EV, raw)
    rows, rejected = transcode(CURRENT, [msg])
    assert rows == [] and len(rejected) == 1
    _, got_reason, got_detail = rejected[0]
    assert (got_reason, detail in got_detail) == (reason, True), got_detail
    try:
        codec.decode(msg)
        accepted = True
    except codec.CodecError:
        accepted = False
    assert accepted == codec_accepts
    if codec_accepts:
        assert STRICTER.search(got_detail)


def test_what_is_valid_passes():
    for s in ("", "a", "é", "日本語", "\U0001f600", "\U0010ffff", "\ud7ff", "\ue000", "a" * 1000):
        msg = body(EV | {"comm": s})
        rows, rejected = transcode(CURRENT, [msg])
        assert rejected == [] and rows[0]["comm"] == s
    # a varint padded to 10 bytes is still an Avro long (fastavro reads it the same)
    msg = body(EV, {"uid": b"\x80" * 9 + b"\x00"})
    rows, rejected = transcode(CURRENT, [msg])
    assert rejected == [] and rows[0] == expected(CURRENT, msg) and rows[0]["uid"] == 0


def test_truncation_at_every_byte_is_rejected():
    msg = codec.encode(make_event(7))
    for cut in range(len(msg)):
        rows, rejected = transcode(CURRENT, [msg[:cut]])
        assert rows == [] and rejected[0][1] in ("truncated", "corrupt_body", "bad_magic"), cut


# --- the property: the codec is the judge ---------------------------------------------
_INT = st.integers(-(2**31), 2**31 - 1)
_LONG = st.integers(-(2**63), 2**63 - 1)
_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=24)


def _strategy(field):
    if field.kind == "enum":
        base = st.sampled_from(ENUMS[field.name])
    else:
        base = {"string": _TEXT, "long": _LONG, "int": _INT, "bool": st.booleans()}[field.kind]
    return st.none() | base if field.nullable else base


EVENTS = st.fixed_dictionaries({f.name: _strategy(f) for f in FIELDS})


@st.composite
def damaged_messages(draw):
    version = draw(st.sampled_from(sorted(codec.SCHEMAS)))
    msg = bytearray(codec.Encoder(version).encode(fit(version, draw(EVENTS))))
    for _ in range(draw(st.integers(1, 3))):
        if not msg:
            break
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "overwrite"]))
        # mostly the body; sometimes the header
        pos = draw(st.integers(0 if draw(st.integers(0, 9)) == 0 else min(10, len(msg) - 1), len(msg) - 1))
        if op == "truncate":
            del msg[pos:]
        elif op == "flip":
            msg[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            msg[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del msg[pos:pos + draw(st.integers(1, 4))]
        elif op == "overwrite":
            b = draw(st.sampled_from([0x00, 0x01, 0x02, 0x7F, 0x80, 0xFF, 0xC0, 0xED, 0xF4]))
            msg[pos] = b
    return version, bytes(msg)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damaged_messages(), EVENTS)
def test_damaged_messages_are_judged_by_the_codec(damaged, neighbour):
    version, msg = damaged
    try:
        want = expected(version, msg)
        codec_error = None
    except codec.CodecError as e:
        want, codec_error = None, e
    good = codec.Encoder(version).encode(fit(version, neighbour))
    rows, rejected = transcode(version, [good, msg, good])
    assert rows[0] == rows[-1] == expected(version, good)  # the neighbours are untouched
    if rejected:
        assert [i for i, _, _ in rejected] == [1] and len(rows) == 2
        _, reason, detail = rejected[0]
        assert reason in ("truncated", "corrupt_body", "bad_magic", "unknown_fingerprint")
        if codec_error is None:  # stricter than fastavro: only by a documented rule
            assert STRICTER.search(detail), (detail, msg.hex())
            event(f"stricter: {STRICTER.search(detail).group(0).split()[0]}")
        else:
            event(f"both reject ({codec_error.reason} / {reason})")
    else:
        assert codec_error is None, f"the codec rejects ({codec_error}) what the transcoder accepted: {msg.hex()}"
        assert rows[1] == want
        event("both accept")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([b"", b"\xc3\x01", codec.MAGIC + codec.FINGERPRINTS[CURRENT]]))
def test_random_bytes_never_crash_and_never_make_a_row_the_codec_refuses(noise, prefix):
    msg = prefix + noise
    rows, rejected = transcode(CURRENT, [msg] * 3)
    if rows:
        assert rows == [expected(CURRENT, msg)] * 3
    else:
        assert [i for i, _, _ in rejected] == [0, 1, 2]


def test_blocks_outlive_the_next_call_and_other_threads():
    """Block memory is reused only once a block is gone; two threads transcode at once."""
    import threading

    msgs = [codec.encode(make_event(i)) for i in range(2000)]
    first = conversion.payload(CURRENT, msgs)
    keep = bytes(first.data)
    results = []

    def work():
        for _ in range(20):
            p = conversion.payload(CURRENT, msgs)
            results.append(bytes(p.data) == keep)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bytes(first.data) == keep and all(results) and len(results) == 40
