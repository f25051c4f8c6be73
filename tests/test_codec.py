"""The Avro contract and the single-object codec (no services needed)."""

from __future__ import annotations

import io
import json
import struct

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from hypothesis import given, settings
from hypothesis import strategies as st

from fdpass.schemas import avro, codec
from fdpass.schemas.fields import BY_NAME, ENUMS, FIELDS, FIELD_NAMES
from fdpass.schemas.synthetic import make_event

V1_NAMES = [f.name for f in avro.v1_fields()]
ADDED = [f for f in FIELDS if f.name not in V1_NAMES]
V2_NAMES = [f["name"] for f in avro.load_schema_file(2)["fields"]]
V3_ADDED = {"abi": "X86_64", "file_verified": False, "transfer_id": None}  # what a pre-v3 message reads as


def defaults(names) -> dict:
    """The values the current reader gives the fields `names` when a message lacks them."""
    return {name: avro.default_value(BY_NAME[name]) for name in names}


def old_symbols(version: int) -> dict[str, list[str]]:
    """The enum symbols of a shipped schema version, by field."""
    return {f["name"]: f["type"]["symbols"] for f in avro.load_schema_file(version)["fields"]
            if isinstance(f["type"], dict) and f["type"]["type"] == "enum"}


# --- the schema files ----------------------------------------------------------
def test_current_schema_file_is_generated_from_fields():
    # If this fails, FIELDS changed: ship a new fdpass_event.vN.avsc instead of
    # editing a published one (see schemas/avro.py).
    path = avro.SCHEMA_DIR / avro.SCHEMA_FILES[avro.CURRENT_VERSION]
    assert path.read_text() == avro.render(avro.event_schema())


def test_v1_schema_file_is_the_design_contract():
    names = [f["name"] for f in avro.load_schema_file(1)["fields"]]
    assert names == V1_NAMES and V1_NAMES[0] == "event_id" and V1_NAMES[-1] == "probe" and len(V1_NAMES) == 34


@pytest.mark.parametrize("version", sorted(avro.SCHEMA_FILES))
def test_every_shipped_file_is_an_earlier_state_of_fields(version):
    """Each version only appended: fields (same type, same default) and enum symbols. Frozen
    files cannot be regenerated once an enum grew, so this is what is checked of old ones."""
    old = avro.load_schema_file(version)
    now = avro.event_schema()
    assert old["name"] == now["name"] and old["namespace"] == now["namespace"]
    assert [f["name"] for f in old["fields"]] == list(FIELD_NAMES[: len(old["fields"])])
    for was, cur in zip(old["fields"], now["fields"]):
        wt, ct = was["type"], cur["type"]
        if isinstance(wt, dict):  # an enum: its symbols are a prefix of today's
            assert {**wt, "symbols": None} == {**ct, "symbols": None}, was["name"]
            assert ct["symbols"][: len(wt["symbols"])] == wt["symbols"], was["name"]
        else:
            assert wt == ct, was["name"]
        assert ("default" in was, was.get("default")) == ("default" in cur, cur.get("default")), was["name"]
    assert old_symbols(2)["syscall"] == ["SENDMSG", "SENDMMSG", "RECVMSG", "RECVMMSG", "KERNEL"]


def test_an_added_enum_needs_an_explicit_default_symbol():
    from fdpass.schemas.fields import Field

    with pytest.raises(ValueError, match="explicit default"):
        avro.event_schema(FIELDS + (Field("direction", "enum", False, "again"),))
    with pytest.raises(ValueError, match="not one of its symbols"):
        avro.event_schema(FIELDS + (Field("direction", "enum", False, "again", default="UP"),))
    by_name = {f["name"]: f for f in avro.current_schema()["fields"]}
    assert by_name["abi"]["default"] == "X86_64" and by_name["abi"]["type"]["symbols"][0] == "X86_64"


def test_schema_shape():
    schema = avro.current_schema()
    assert [f["name"] for f in schema["fields"]] == list(FIELD_NAMES)
    by_name = {f["name"]: f for f in schema["fields"]}
    for name, symbols in ENUMS.items():
        assert by_name[name]["type"]["type"] == "enum"
        assert by_name[name]["type"]["symbols"] == list(symbols)
    for f in FIELDS:
        if f.nullable:
            assert by_name[f.name]["type"][0] == "null" and by_name[f.name]["default"] is None
    for f in ADDED:  # every addition must be optional, or v1 messages become unreadable
        assert "default" in by_name[f.name]
    for f in avro.v1_fields():
        if not f.nullable:
            assert "default" not in by_name[f.name], f.name  # contract fields are required


def test_fingerprint_matches_avro_spec_vectors():
    # From Apache Avro's share/test/data/schema-tests.txt (signed Java longs).
    for canonical, java_long in [('"null"', 7195948357588979594), ('"boolean"', -6970731678124411036),
                                 ('"int"', 8247732601305521295), ('"long"', -3434872931120570953)]:
        assert codec.crc64_avro(canonical.encode()) == java_long & 0xFFFFFFFFFFFFFFFF
    # A message header carries those 8 bytes little-endian.
    assert codec.fingerprint("null") == struct.pack("<q", 7195948357588979594)


def test_shipped_fingerprints_are_distinct_and_stable():
    assert len(set(codec.FINGERPRINTS.values())) == len(avro.SCHEMA_FILES) == 3
    # published: a message's header names its schema by these bytes forever
    assert {v: fp.hex() for v, fp in codec.FINGERPRINTS.items()} == {
        1: "46f48379dc514a85", 2: "5e231789b44c63d9", 3: "409cbe60c8ac1648"}
    msg = codec.encode(make_event(1))
    assert msg[:2] == b"\xc3\x01" and msg[2:10] == codec.FINGERPRINTS[avro.CURRENT_VERSION]


# --- round trips -----------------------------------------------------------------
@pytest.mark.parametrize("seq", range(12))
def test_synthetic_events_round_trip(seq):
    event = make_event(seq)
    assert codec.decode(codec.encode(event)) == event


def test_every_enum_symbol_round_trips():
    for name, symbols in ENUMS.items():
        for sym in symbols:
            event = make_event(3) | {name: sym}
            assert codec.decode(codec.encode(event))[name] == sym


def test_nullable_fields_round_trip_both_ways():
    for f in FIELDS:
        if f.nullable:
            base = make_event(0)
            for value in (None, "x" if f.kind == "string" else 7):
                event = base | {f.name: value}
                assert codec.decode(codec.encode(event))[f.name] == value


def test_extremes_round_trip():
    event = make_event(2) | {
        "time_ns": 2**63 - 1, "uid": 2**32 - 1, "ret": -(2**63), "pid": 2**31 - 1, "fd": -(2**31),
        "file_path": "/tmp/ünïcødé \U0001f600 (deleted)", "comm": "", "path_truncated": True, "msg_ctrunc": True,
    }
    assert codec.decode(codec.encode(event)) == event


def test_added_fields_are_optional_on_encode():
    event = {k: v for k, v in make_event(5).items() if k in V1_NAMES}
    out = codec.decode(codec.encode(event))
    assert {f.name: out[f.name] for f in ADDED} == {"msg_index": 0, "seq": 0, "path_truncated": False,
                                                     "fds_truncated": False, "msg_ctrunc": False} | V3_ADDED


def test_v1_writer_current_reader_gets_defaults():
    event_v1 = {k: v for k, v in make_event(7).items() if k in V1_NAMES}
    msg = codec.Encoder(version=1).encode(event_v1)
    assert msg[2:10] == codec.FINGERPRINTS[1]
    out = codec.decode(msg)
    assert list(out) == list(FIELD_NAMES)
    assert {k: out[k] for k in V1_NAMES} == event_v1
    assert all(out[f.name] in (0, False) for f in ADDED if f.name not in V3_ADDED)
    assert {k: out[k] for k in V3_ADDED} == V3_ADDED


def test_v2_writer_current_reader_gets_the_v3_defaults():
    """Every event before v3 came from native 64-bit syscall tracepoints: abi X86_64, and nothing
    was read from the kernel's SCM_RIGHTS list (file_verified false, no transfer_id)."""
    event = make_event(9) | {"abi": "IA32", "file_verified": True, "transfer_id": 77, "seq": 5, "msg_ctrunc": True}
    msg = codec.Encoder(version=2).encode(event)  # a v2 writer does not know the v3 keys
    assert msg[2:10] == codec.FINGERPRINTS[2]
    out = codec.decode(msg)
    assert list(out) == list(FIELD_NAMES)
    assert out == {k: event[k] for k in V2_NAMES} | V3_ADDED
    assert defaults(V3_ADDED) == V3_ADDED


def test_new_writer_old_readers_drop_new_fields():
    event = make_event(8) | {"seq": 99, "msg_ctrunc": True, "abi": "X32", "transfer_id": 12}
    for version, names in ((1, V1_NAMES), (2, V2_NAMES)):
        out = codec.Decoder(reader_version=version).decode(codec.encode(event))
        assert list(out) == names
        assert out == {k: event[k] for k in names}


def test_an_io_uring_syscall_is_unreadable_for_an_older_reader():
    """The v1/v2 Syscall enums have no default symbol, so Avro resolution cannot map a symbol
    they lack. (Only a test or tool picks an old reader: a deployed reader that predates a
    writer does not know its fingerprint and says unknown_fingerprint first.)"""
    msg = codec.encode(make_event(8) | {"syscall": "IO_URING_SENDMSG_ZC"})
    assert codec.decode(msg)["syscall"] == "IO_URING_SENDMSG_ZC"
    with pytest.raises(codec.CorruptBody):
        codec.Decoder(reader_version=2).decode(msg)
    with pytest.raises(codec.EncodeError, match="IO_URING_RECVMSG"):
        codec.Encoder(version=2).encode(make_event(8) | {"syscall": "IO_URING_RECVMSG"})


def test_fastavro_reads_the_body_and_writes_the_same_bytes():
    # The fast writer is an independent implementation: fastavro is the oracle.
    event = make_event(11)
    msg = codec.encode(event)
    parsed = parse_schema(avro.current_schema())
    assert schemaless_reader(io.BytesIO(msg[10:]), parsed, None) == event
    buf = io.BytesIO()
    schemaless_writer(buf, parsed, event)
    assert msg[10:] == buf.getvalue()


# --- bad events and bad messages -------------------------------------------------
@pytest.mark.parametrize("change", [
    {"direction": "SIDEWAYS"}, {"pid": "12"}, {"pid": 2**31}, {"time_ns": 2**64}, {"comm": None},
    {"file_path": b"/etc/passwd"}, {"exe": 5},
])
def test_encode_rejects_events_that_do_not_fit(change):
    with pytest.raises(codec.EncodeError) as err:
        codec.encode(make_event(1) | change)
    assert err.value.reason == "encode" and isinstance(err.value, ValueError)


def test_encode_rejects_missing_required_field():
    event = make_event(1)
    del event["host_id"]
    with pytest.raises(codec.EncodeError, match="host_id"):
        codec.encode(event)


GOOD = codec.encode(make_event(4))


@pytest.mark.parametrize("data,error,reason", [
    (b"", codec.TruncatedMessage, "truncated"),
    (b"\xc3", codec.TruncatedMessage, "truncated"),
    (b"\xc3\x01\x00\x00", codec.TruncatedMessage, "truncated"),
    (b"{\"event_id\": 1}", codec.BadMagic, "bad_magic"),
    (b"\x00\x00\x00\x00\x01" + GOOD[5:], codec.BadMagic, "bad_magic"),  # Confluent wire format
    (b"\xc3\x01" + b"\xff" * 8 + GOOD[10:], codec.UnknownFingerprint, "unknown_fingerprint"),
    (GOOD[:10], codec.TruncatedMessage, "truncated"),
    (GOOD[:-1], codec.TruncatedMessage, "truncated"),
    (GOOD[: len(GOOD) // 2], codec.TruncatedMessage, "truncated"),
    (GOOD + b"\x00", codec.CorruptBody, "corrupt_body"),
    (GOOD[:10] + b"\xff" * 40, codec.CorruptBody, "corrupt_body"),  # an over-long varint, not a cut one
])
def test_bad_messages_give_typed_errors(data, error, reason):
    with pytest.raises(error) as err:
        codec.decode(data)
    assert err.value.reason == reason
    assert isinstance(err.value, codec.CodecError) and str(err.value)


def test_a_message_cut_anywhere_is_truncated():
    """Also inside a varint (fastavro says IndexError there, not EOFError): v3 ends with a long."""
    for seq in (1, 4, 5):
        msg = codec.encode(make_event(seq))
        for cut in range(codec.HEADER_LEN, len(msg)):
            with pytest.raises(codec.TruncatedMessage):
                codec.decode(msg[:cut])


def test_corrupt_enum_index_is_corrupt_body():
    # Find the direction byte by encoding two events that differ only there.
    a = codec.encode(make_event(0) | {"direction": "SEND"})
    b = codec.encode(make_event(0) | {"direction": "RECV"})
    (pos,) = [i for i in range(len(a)) if a[i] != b[i]]
    bad = a[:pos] + bytes([0x7E]) + a[pos + 1:]  # enum index 63: no such symbol
    with pytest.raises(codec.CorruptBody):
        codec.decode(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_crash_the_decoder(noise):
    for data in (noise, GOOD[:10] + noise, GOOD[:40] + noise):
        try:
            codec.decode(data)
        except codec.CodecError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_corruption_of_a_good_message(data):
    pos = data.draw(st.integers(10, len(GOOD) - 1))
    byte = data.draw(st.integers(0, 255))
    try:
        codec.decode(GOOD[:pos] + bytes([byte]) + GOOD[pos + 1:])
    except codec.CodecError:
        pass


# --- property test over random events --------------------------------------------
_INT = st.integers(-(2**31), 2**31 - 1)
_LONG = st.integers(-(2**63), 2**63 - 1)
_TEXT = st.text(max_size=40)


def _strategy(field):
    base = {"string": _TEXT, "long": _LONG, "int": _INT, "bool": st.booleans()}.get(field.kind)
    if field.kind == "enum":
        base = st.sampled_from(ENUMS[field.name])
    return st.none() | base if field.nullable else base


EVENTS = st.fixed_dictionaries({f.name: _strategy(f) for f in FIELDS})


@settings(max_examples=400, deadline=None)
@given(EVENTS)
def test_random_events_round_trip_and_match_fastavro(event):
    msg = codec.encode(event)
    assert codec.decode(msg) == event
    assert msg == codec._ENCODER.encode_with_fastavro(event)


@settings(max_examples=150, deadline=None)
@given(EVENTS)
def test_random_events_cross_versions(event):
    for version in (1, 2):
        names = V1_NAMES if version == 1 else V2_NAMES
        old_event = {k: event[k] for k in names}
        readable = all(old_event[k] in syms for k, syms in old_symbols(version).items())
        if readable:
            assert codec.Decoder(reader_version=version).decode(codec.encode(event)) == old_event
            up = codec.decode(codec.Encoder(version=version).encode(old_event))
            assert up == old_event | defaults(n for n in FIELD_NAMES if n not in names)
        else:  # a symbol added since: the old schema can neither read nor write it
            with pytest.raises(codec.CorruptBody):
                codec.Decoder(reader_version=version).decode(codec.encode(event))
            with pytest.raises(codec.EncodeError):
                codec.Encoder(version=version).encode(old_event)


def test_schema_files_are_valid_json_with_doc():
    for version, name in avro.SCHEMA_FILES.items():
        schema = json.loads((avro.SCHEMA_DIR / name).read_text())
        assert schema["namespace"] == "io.fdpass" and schema["name"] == "Event"
        parse_schema(schema)


def test_table_driven_varints_match_the_plain_loop():
    # The writer's varint takes shortcuts at 2**14 and 2**28; check around both and far beyond.
    edges = [b + d for b in (0, 1 << 7, 1 << 14, 1 << 21, 1 << 28, 1 << 35, 1 << 56, 1 << 63) for d in (-1, 0, 1)]
    for z in [e for e in edges if e >= 0] + [2**64 - 1]:
        assert codec._varint(z) == codec._varint_loop(z), z


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 2**64 - 1))
def test_random_varints_match_the_plain_loop(z):
    assert codec._varint(z) == codec._varint_loop(z)


def test_encode_long_is_avro_zigzag_varint():
    """fastavro is the reference encoder."""
    import io

    import fastavro

    for n in (0, -1, 1, 63, 64, -65, 2**31, -(2**63), 2**63 - 1):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, "long", n)
        assert codec.encode_long(n) == buf.getvalue(), n


# --- the C writer (schemas/avro_writer.c) against the Python writer and fastavro ---
PY_ENCODER = codec.Encoder(prefer_c=False)


def test_the_c_writer_is_built_and_in_use():
    # scripts/setup builds it; a silently missing extension would quietly cost
    # the collector half its publish rate.
    assert codec._ENCODER.writer == "c"
    assert PY_ENCODER.writer == "python"


@settings(max_examples=400, deadline=None)
@given(EVENTS)
def test_python_writer_matches_fastavro_too(event):
    # The fallback when the C extension is missing must stay byte-identical.
    assert PY_ENCODER.encode(event) == codec._ENCODER.encode_with_fastavro(event)


@settings(max_examples=200, deadline=None)
@given(EVENTS, st.randoms(use_true_random=False), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
def test_key_order_and_extra_keys_do_not_change_the_bytes(event, rnd, extra):
    # The C writer walks the dict in schema order as a shortcut; any other
    # order, and keys the schema does not know, must give the same message.
    items = list((extra | event).items())
    rnd.shuffle(items)
    assert codec.encode(dict(items)) == codec.encode(event)


_ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False),
    st.text(max_size=8), st.binary(max_size=8), st.sampled_from(["SEND", "RECV", "REGULAR", "KERNEL", "\udcff"]),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(FIELD_NAMES), _ODD_VALUES)
def test_c_and_python_writers_agree_on_any_value(name, value):
    # Same bytes when a value fits, an EncodeError from both when it does not.
    event = make_event(3) | {name: value}
    results = []
    for encoder in (codec._ENCODER, PY_ENCODER):
        try:
            results.append(encoder.encode(event))
        except codec.EncodeError:
            results.append("EncodeError")
    # The Python writer probes its per-field memo first: 5.0 would hit a
    # memoised 5 there. Floats are not Avro ints either way; the C writer
    # always says so, which is the rule both document.
    if isinstance(value, float) and BY_NAME[name].kind in ("int", "long") and results[1] != "EncodeError":
        assert results[0] == "EncodeError"
        return
    assert results[0] == results[1], (name, value, results)


def test_c_writer_missing_field_default_and_errors_name_the_field():
    event = make_event(4)
    del event["seq"]  # an added field: its default (0) is written
    assert codec.decode(codec.encode(event))["seq"] == 0
    for name in V3_ADDED:  # an enum's default symbol and a null default too, by both writers
        del event[name]
    assert codec.encode(event) == PY_ENCODER.encode(event) == codec._ENCODER.encode_with_fastavro(event)
    assert {k: codec.decode(codec.encode(event))[k] for k in V3_ADDED} == V3_ADDED
    del event["pid"]  # a contract field: no default
    with pytest.raises(codec.EncodeError, match="pid"):
        codec.encode(event)
    with pytest.raises(codec.EncodeError, match="SIDEWAYS"):
        codec.encode(make_event(4) | {"direction": "SIDEWAYS"})
    with pytest.raises(codec.EncodeError, match="not a dict|must be a dict"):
        codec.encode([("pid", 1)])


def test_c_writer_long_strings_and_error_paths_do_not_leak():
    import tracemalloc

    big = make_event(5) | {"file_path": "/" + "x" * 5000}  # past the writer's 1 KiB stack buffer
    bad = big | {"ret": "not a number"}  # fails after the heap buffer was taken
    encode = codec.encode

    def rounds(n):
        for _ in range(n):
            encode(big)
            try:
                encode(bad)
            except codec.EncodeError:
                pass

    rounds(1000)  # warm-up: interned names, cached UTF-8, exception machinery
    tracemalloc.start()
    try:
        rounds(5000)
        after_5k = tracemalloc.get_traced_memory()[0]
        rounds(20_000)
        after_25k = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # A leak of even one byte per call would show as 40k+ more bytes here.
    assert after_25k - after_5k < 16 * 1024, f"{after_25k - after_5k} bytes more after 40k more encodes"


def test_one_header_check_for_decoder_and_sink():
    """codec.header_version is the one Python header check: the decoder's
    errors and the sink's dead-letter reasons come from it (same order of
    checks as the C transcoder: magic, length, fingerprint)."""
    from fdpass.sinks import conversion

    good = codec.encode(make_event(1))
    cases = [b"", b"\xc3", b"xx", b"xx" + good[2:], good[:5], b"\xc3\x01" + b"\0" * 8 + good[10:], good,
             None]
    dec = codec.Decoder()
    for m in cases:
        v = codec.header_version(m)
        assert conversion.header_version(m) == v
        if m is None:
            continue
        if isinstance(v, int):
            assert dec.writer_version(m) == v == avro.CURRENT_VERSION
        else:
            with pytest.raises(codec.CodecError) as err:
                dec.writer_version(m)
            assert err.value.reason == v, m
    assert [codec.header_version(m) for m in cases[:6]] == ["truncated", "truncated", "bad_magic", "bad_magic",
                                                            "truncated", "unknown_fingerprint"]
