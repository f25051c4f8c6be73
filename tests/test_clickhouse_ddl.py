"""The ClickHouse DDL generated from FIELDS, run on a real embedded ClickHouse (chDB)."""

from __future__ import annotations

import pytest

from fdpass.errors import UserError
from fdpass.schemas import clickhouse as ddl
from fdpass.schemas import codec
from fdpass.schemas.avro import LAST_V1_FIELD, load_schema_file
from fdpass.schemas.fields import BY_NAME, FIELD_NAMES, FIELDS
from fdpass.schemas.synthetic import make_event
from fdpass.sinks.store import parse_dsn

V1_FIELDS = FIELDS[: FIELD_NAMES.index(LAST_V1_FIELD) + 1]
V2_FIELDS = FIELDS[: len(load_schema_file(2)["fields"])]
V2_SYSCALLS = ("SENDMSG", "SENDMMSG", "RECVMSG", "RECVMMSG", "KERNEL")


def _columns(client) -> dict[str, str]:
    rows = client.query("SELECT name, type FROM system.columns WHERE database = 'fdpass' AND table = 'events' "
                        "ORDER BY position").result_rows
    return dict(rows)


def test_create_is_idempotent_and_follows_the_contract(open_store):
    store = open_store()
    c = store.client()
    assert ddl.ensure_schema(c) == []
    assert ddl.ensure_schema(c) == []  # second run: nothing to do
    cols = _columns(c)
    assert list(cols)[: len(FIELDS)] == list(FIELD_NAMES)  # names and order = the contract
    assert cols["time"] == "DateTime64(9, 'UTC')"
    assert cols["direction"] == "Enum8('SEND' = 1, 'RECV' = 2)"
    assert cols["host"] == "LowCardinality(String)"
    assert cols["exe"] == "LowCardinality(Nullable(String))"
    assert cols["peer_sock_ino"] == "Nullable(Int64)"
    assert cols["abi"] == "Enum8('X86_64' = 1, 'IA32' = 2, 'X32' = 3)"
    assert cols["file_verified"] == "Bool" and cols["transfer_id"] == "Nullable(Int64)"
    assert cols["syscall"].endswith("'KERNEL' = 5, 'IO_URING_SENDMSG' = 6, 'IO_URING_SENDMSG_ZC' = 7, "
                                    "'IO_URING_RECVMSG' = 8)")
    defaults = dict(c.query("SELECT name, default_expression FROM system.columns WHERE database = 'fdpass' "
                            "AND table = 'events' AND default_kind = 'DEFAULT'").result_rows)
    assert defaults == {"abi": "'X86_64'"}
    create = c.query("SELECT create_table_query, partition_key, sorting_key FROM system.tables "
                     "WHERE database = 'fdpass' AND name = 'events'").result_rows[0]
    assert create[1] == "toDate(time)"
    assert create[2] == "host, time"
    assert "non_replicated_deduplication_window = 1000" in create[0]
    assert f"min_bytes_for_wide_part = {128 << 20}" in create[0]  # inserts write Compact parts
    assert "CODEC(Delta(8), ZSTD(1))" in create[0]  # time_ns / seq / time


def test_time_is_derived_and_dedup_tokens_work_on_plain_mergetree(open_store):
    c = open_store().client()
    ddl.ensure_schema(c)
    names = ["event_id", "time_ns", "host", "direction", "syscall", "file_type"]
    row = ["e1", 1_795_000_000_123_456_789, "h", "SEND", "SENDMSG", "REGULAR"]
    for _ in range(2):
        c.insert("fdpass.events", [row], column_names=names, settings={"insert_deduplication_token": "tok-1"})
    assert c.query("SELECT count() FROM fdpass.events").result_rows == [(1,)]
    assert c.query("SELECT toString(time) FROM fdpass.events").result_rows == [("2026-11-18 11:06:40.123456789",)]


def test_empty_event_id_is_rejected_by_clickhouse(open_store):
    c = open_store().client()
    ddl.ensure_schema(c)
    with pytest.raises(Exception, match="VIOLATED_CONSTRAINT|event_id_set"):
        c.insert("fdpass.events", [["", 1, "h", "SEND", "SENDMSG", "REGULAR"]],
                 column_names=["event_id", "time_ns", "host", "direction", "syscall", "file_type"])


def test_a_table_made_before_the_part_setting_gets_it(open_store):
    c = open_store().client()
    for stmt in ddl.create_statements():
        c.command(stmt.replace(f", min_bytes_for_wide_part = {ddl.WIDE_PART_BYTES}", ""))
    assert ddl.ensure_schema(c) == [f"ALTER TABLE fdpass.events MODIFY SETTING min_bytes_for_wide_part = {128 << 20}"]
    assert ddl.ensure_schema(c) == []


def test_migrate_adds_missing_contract_columns(open_store):
    c = open_store().client()
    for stmt in ddl.create_statements(fields=V1_FIELDS):  # a store made by a v1-era sink
        c.command(stmt)
    assert "seq" not in _columns(c)
    alters = ddl.ensure_schema(c)
    added = [f.name for f in FIELDS[len(V1_FIELDS):]]
    assert len(alters) == len(added) and all("ADD COLUMN" in a for a in alters)
    assert list(_columns(c))[: len(FIELDS)] == list(FIELD_NAMES)
    assert ddl.ensure_schema(c) == []


def _v2_store(c) -> None:
    """The events table as a v2-era sink made it: no v3 columns, syscall without the IO_URING_* symbols."""
    old = ddl.enum_type(BY_NAME["syscall"], V2_SYSCALLS)
    for stmt in ddl.create_statements(fields=V2_FIELDS):
        c.command(stmt.replace(f"syscall {ddl.column_type(BY_NAME['syscall'])}", f"syscall {old}"))
    assert _columns(c)["syscall"] == old and "abi" not in _columns(c)


def test_migrate_from_v2_widens_syscall_and_adds_the_v3_columns_with_their_defaults(open_store):
    """Rows stored before the migration read as what a v2 message gives the current reader:
    abi X86_64, file_verified false, transfer_id NULL."""
    from tests.fixtures_clickhouse import insert_messages

    c = open_store().client()
    _v2_store(c)
    old = [make_event(i) | {"event_id": f"old-{i}"} for i in range(4)]
    assert insert_messages(c, "fdpass.events", 2, [codec.Encoder(2).encode(e) for e in old], "t/v2") == []
    alters = ddl.ensure_schema(c)
    assert alters == [
        f"ALTER TABLE fdpass.events MODIFY COLUMN {ddl.column_def(BY_NAME['syscall'])}",
        "ALTER TABLE fdpass.events ADD COLUMN IF NOT EXISTS abi Enum8('X86_64' = 1, 'IA32' = 2, 'X32' = 3) "
        "DEFAULT 'X86_64' AFTER msg_ctrunc",
        "ALTER TABLE fdpass.events ADD COLUMN IF NOT EXISTS file_verified Bool AFTER abi",
        "ALTER TABLE fdpass.events ADD COLUMN IF NOT EXISTS transfer_id Nullable(Int64) AFTER file_verified",
    ]
    assert list(_columns(c))[: len(FIELDS)] == list(FIELD_NAMES)
    assert ddl.ensure_schema(c) == []
    new = make_event(9) | {"event_id": "new", "syscall": "IO_URING_SENDMSG_ZC", "abi": "IA32",
                           "file_verified": True, "transfer_id": 42}
    assert insert_messages(c, "fdpass.events", 3, [codec.encode(new)], "t/v3") == []
    # and a v2 message after the migration, through the Native transcoder (its block lacks the v3 columns)
    late = make_event(5) | {"event_id": "late"}
    assert insert_messages(c, "fdpass.events", 2, [codec.Encoder(2).encode(late)], "t/v2b") == []
    rows = {r[0]: r[1:] for r in c.query("SELECT event_id, syscall, abi, file_verified, transfer_id "
                                         "FROM fdpass.events").result_rows}
    for e in old + [late]:
        assert rows[e["event_id"]] == (e["syscall"], "X86_64", False, None)
    assert rows["new"] == ("IO_URING_SENDMSG_ZC", "IA32", True, 42)


def test_enum_gaining_a_symbol_is_widened():
    f = next(f for f in FIELDS if f.name == "direction")
    old = {x.name: ddl.column_type(x) for x in FIELDS} | {"time": "DateTime64(9, 'UTC')"}
    old["direction"] = "Enum8('SEND' = 1)"
    alters = ddl.migrate_statements(old)
    assert alters == [f"ALTER TABLE fdpass.events MODIFY COLUMN {ddl.column_def(f)}"]


def test_ttl_is_configurable():
    stmt = ddl.create_statements(ddl.Options(ttl_days=90))[1]
    assert "TTL toDate(time) + INTERVAL 90 DAY" in stmt
    assert "TTL" not in ddl.create_statements()[1]


def test_cluster_variant_parses_and_is_replicated(open_store):
    c = open_store().client()
    stmts = ddl.cluster_statements(ddl.Options(ttl_days=30), cluster="fleet")
    for stmt in stmts:
        # formatQuery parses with ClickHouse's own parser: a syntax error fails here.
        formatted = c.query("SELECT formatQuery({q:String})", parameters={"q": stmt}).result_rows[0][0]
        assert "ON CLUSTER fleet" in formatted
    text = "\n".join(stmts)
    assert "ReplicatedMergeTree('/clickhouse/tables/{shard}/fdpass/{table}', '{replica}')" in text
    assert "Distributed('fleet', fdpass, events_local, cityHash64(host_id))" in text
    assert "replicated_deduplication_window" in text
    assert "TTL toDate(time) + INTERVAL 30 DAY" in text


@pytest.mark.parametrize("dsn,kind,path,host,port,db", [
    ("chdb:///tmp/x", "chdb", "/tmp/x", None, None, "fdpass"),
    ("chdb://", "chdb", "/var/lib/fdpass/store", None, None, "fdpass"),
    ("http://reader@ch.example:8123/forensics", "http", None, "ch.example", 8123, "forensics"),
    ("https://ch.example", "http", None, "ch.example", 8443, "fdpass"),
])
def test_dsn(dsn, kind, path, host, port, db):
    s = parse_dsn(dsn)
    assert (s.kind, s.path, s.host, s.port, s.database) == (kind, path, host, port, db)


@pytest.mark.parametrize("dsn,msg", [
    ("http://u:secret@h:8123/db", "do not put the password"),
    ("chdb://relative/path", "absolute path"),
    ("mysql://h", "expected chdb"),
])
def test_bad_dsn(dsn, msg):
    with pytest.raises(UserError, match=msg):
        parse_dsn(dsn)


def test_cluster_migration_alters_render_on_cluster_and_parse(open_store):
    """On a cluster the sink never ALTERs the Distributed front; it names these ON CLUSTER ALTERs instead.

    (chDB has no cluster defined, so a real Distributed table cannot be made
    here; the statements are checked with ClickHouse's parser.)
    """
    c = open_store().client()
    existing = {f.name: ddl.column_type(f) for f in V1_FIELDS} | {"time": "DateTime64(9, 'UTC')"}
    alters = (ddl.migrate_statements(existing, table="events_local", cluster="{cluster}")
              + ddl.migrate_statements(existing, cluster="{cluster}"))
    assert alters[0] == "ALTER TABLE fdpass.events_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS msg_index Int32 AFTER probe"
    assert len(alters) == 2 * (len(FIELDS) - len(V1_FIELDS))
    assert ("ALTER TABLE fdpass.events ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS abi "
            "Enum8('X86_64' = 1, 'IA32' = 2, 'X32' = 3) DEFAULT 'X86_64' AFTER msg_ctrunc") in alters
    for a in alters:
        c.query("SELECT formatQuery({q:String})", parameters={"q": a})
    assert "events_local ON CLUSTER" in str(ddl.ClusterSchemaOutdated(alters))
