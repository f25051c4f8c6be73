"""The ClickHouse side of the event contract: DDL for `fdpass.events`, generated from fields.FIELDS.

Column names are the contract's field names; the ClickHouse type of each
field is chosen here, in one place, from its logical kind (`_TYPE`) plus a
few per-field choices (`_LOW_CARDINALITY`, `_CODECS`).

Layout decisions (why):
- ORDER BY (host, time): the forensic questions are "what happened on host H
  between t1 and t2" (a timeline, the transfers of one host, who touched a
  file there); with host first and time second such a query reads one narrow
  key range. Questions across the fleet for one time window still prune by
  the daily partition (toDate(time)) and by the time column's place in the
  key (generic exclusion). Lookups by file, socket or container across hosts
  use the bloom-filter skip indexes below instead of the sort key.
- time is MATERIALIZED from time_ns, so producers only send time_ns (the
  Avro contract) and the partition key and sort key get a real DateTime64.
- Deduplication: the sink inserts each batch with an insert_deduplication_token
  (see sinks/exactly_once.py); on a plain MergeTree ClickHouse only remembers tokens
  when `non_replicated_deduplication_window` > 0. The window is counted in
  inserted blocks (parts); the sink only ever needs the last few batches of a
  partition remembered (it records finished batches itself), so 1000 is a
  wide margin that costs a small file of hashes.
- No ReplacingMergeTree / FINAL: dedup happens at insert, so `count()` is
  exact at all times, and merges never change results.
- min_bytes_for_wide_part = 128 MiB (ClickHouse's default: 10 MiB): the
  sink's inserts (50-100k events, 13-26 MiB uncompressed) are written as
  Compact parts -- one data file -- instead of Wide ones -- a data and a
  marks file per column, ~90 files. Measured on the project's 2-CPU VM with
  chDB, Native blocks of 100k events, merges stopped: 1.3-1.4 CPU us per
  event against 1.7-2.1 for Wide parts; with 50k-event blocks 2.1 against
  6.1. Merges still write Wide parts once a part passes 128 MiB (~500k
  events), so the months of data that queries scan keep one file per column.
- LowCardinality, the skip indexes and the codecs stay: measured the same
  way, dropping LowCardinality made inserts slower (more bytes to compress),
  the five skip indexes cost ~0.1 us per event at insert and ~0.25 per
  merge, and the ZSTD codecs ~0.5 us per event per merge for a 4x smaller
  store.

Embedded (chDB) and a single server use `create_statements()`; a fleet's
cluster uses `cluster_statements()` (ReplicatedMergeTree + Distributed,
ON CLUSTER), rendered as text for an operator to run or review.
"""

from __future__ import annotations

from dataclasses import dataclass

from fdpass.schemas.fields import ENUMS, FIELDS, Field

DATABASE = "fdpass"
TABLE = "events"
STATE_TABLE = "sink_batches"
DEDUP_WINDOW = 1000
# A part whose uncompressed size is below this is written Compact (see the docstring).
WIDE_PART_BYTES = 128 << 20

# Logical kind -> ClickHouse type (before Nullable/LowCardinality wrapping).
_TYPE = {"string": "String", "long": "Int64", "int": "Int32", "bool": "Bool"}

# Strings with few distinct values per part: dictionary-encoded.
_LOW_CARDINALITY = {"host", "host_id", "boot_id", "kernel", "comm", "parent_comm", "exe", "container_id", "probe"}

# time_ns and seq grow steadily within a host's run of rows (the sort key),
# so Delta turns them into small numbers that ZSTD packs well. Counters and
# ids that repeat (namespaces, cgroup, inodes) compress well with plain ZSTD.
_CODECS = {
    "time_ns": "CODEC(Delta, ZSTD(1))",
    "seq": "CODEC(Delta, ZSTD(1))",
    "event_id": "CODEC(ZSTD(1))",
    "file_path": "CODEC(ZSTD(1))",
    "file_ino": "CODEC(ZSTD(1))",
    "sock_ino": "CODEC(ZSTD(1))",
    "peer_sock_ino": "CODEC(ZSTD(1))",
    "mntns_id": "CODEC(ZSTD(1))",
    "pidns_id": "CODEC(ZSTD(1))",
    "netns_id": "CODEC(ZSTD(1))",
    "cgroup_id": "CODEC(ZSTD(1))",
}

TIME_COLUMN = "time DateTime64(9, 'UTC') MATERIALIZED fromUnixTimestamp64Nano(time_ns, 'UTC') CODEC(Delta, ZSTD(1))"

# Skip indexes for the cross-host lookups (by file, by socket, by container).
_INDEXES = (
    "INDEX idx_file_ino file_ino TYPE bloom_filter(0.01) GRANULARITY 4",
    "INDEX idx_sock_ino sock_ino TYPE bloom_filter(0.01) GRANULARITY 4",
    "INDEX idx_peer_sock_ino peer_sock_ino TYPE bloom_filter(0.01) GRANULARITY 4",
    "INDEX idx_container container_id TYPE bloom_filter(0.01) GRANULARITY 4",
    "INDEX idx_file_path file_path TYPE tokenbf_v1(8192, 3, 0) GRANULARITY 4",
)

# An event without an id would defeat every dedup and join; ClickHouse
# rejects such rows, and the sink routes them to the dead-letter topic.
_CONSTRAINTS = ("CONSTRAINT event_id_set CHECK event_id != ''",)

ORDER_BY = "(host, time)"
PARTITION_BY = "toDate(time)"


def enum_type(field: Field, symbols: tuple[str, ...] | None = None) -> str:
    """Enum8 of the contract's symbols (or of `symbols`, as a writer schema lists them)."""
    symbols = ENUMS[field.name] if symbols is None else symbols
    # Values start at 1 so a zero byte can never be mistaken for a symbol.
    return "Enum8(" + ", ".join(f"'{sym}' = {i}" for i, sym in enumerate(symbols, start=1)) + ")"


def value_type(field: Field, symbols: tuple[str, ...] | None = None) -> str:
    """The ClickHouse type of a field's values, before the LowCardinality choice.
    symbols: an enum's, as a writer schema lists them (default: the contract's)."""
    if field.kind == "enum":
        base = enum_type(field, symbols)
    else:
        try:
            base = _TYPE[field.kind]
        except KeyError:
            raise ValueError(f"field {field.name!r}: no ClickHouse type for kind {field.kind!r}") from None
    return f"Nullable({base})" if field.nullable else base


def low_cardinality(field: Field) -> bool:
    return field.name in _LOW_CARDINALITY


def column_type(field: Field, symbols: tuple[str, ...] | None = None) -> str:
    """The ClickHouse type of a contract field (no codec)."""
    base = value_type(field, symbols)
    return f"LowCardinality({base})" if low_cardinality(field) else base


def _sql_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def column_def(field: Field) -> str:
    """`name type [DEFAULT value] [codec]`. A field's explicit default (fields.py; an added enum
    has one) becomes the column's DEFAULT, so rows of older writers -- inserted without the
    column, or there before an ADD COLUMN -- read as what the Avro reader gives old messages.
    Other columns keep ClickHouse's implicit default, which is already the kind's zero or NULL."""
    codec = _CODECS.get(field.name)
    default = f" DEFAULT {_sql_literal(field.default)}" if field.default is not None and not field.nullable else ""
    return f"{field.name} {column_type(field)}{default}" + (f" {codec}" if codec else "")


def _ttl_clause(ttl_days: int | None) -> str:
    if ttl_days is None or ttl_days <= 0:
        return ""
    return f"\nTTL toDate(time) + INTERVAL {int(ttl_days)} DAY"


def _columns_block(fields: tuple[Field, ...] = FIELDS) -> str:
    items = [column_def(f) for f in fields] + [TIME_COLUMN] + list(_INDEXES) + list(_CONSTRAINTS)
    return "(\n    " + ",\n    ".join(items) + "\n)"


def state_columns_block() -> str:
    return """(
    topic LowCardinality(String),
    topic_id String DEFAULT '',
    partition Int32,
    first_offset Int64,
    last_offset Int64,
    messages UInt32,
    phase Enum8('intent' = 1, 'done' = 2),
    sink String,
    at DateTime64(3, 'UTC') DEFAULT now64(3)
)"""


@dataclass(frozen=True)
class Options:
    database: str = DATABASE
    ttl_days: int | None = None  # None: keep forever
    dedup_window: int = DEDUP_WINDOW


_PART_SETTINGS = f"min_bytes_for_wide_part = {WIDE_PART_BYTES}"


def create_statements(opts: Options = Options(), fields: tuple[Field, ...] = FIELDS) -> list[str]:
    """Idempotent DDL for one server or embedded chDB (IF NOT EXISTS everywhere)."""
    db = opts.database
    return [
        f"CREATE DATABASE IF NOT EXISTS {db}",
        f"CREATE TABLE IF NOT EXISTS {db}.{TABLE}\n{_columns_block(fields)}\n"
        f"ENGINE = MergeTree\nPARTITION BY {PARTITION_BY}\nORDER BY {ORDER_BY}{_ttl_clause(opts.ttl_days)}\n"
        f"SETTINGS non_replicated_deduplication_window = {int(opts.dedup_window)}, {_PART_SETTINGS}",
        # The sink's record of batch offset ranges (sinks/exactly_once.py). Kept 30
        # days: a range is only needed until its offsets are committed.
        f"CREATE TABLE IF NOT EXISTS {db}.{STATE_TABLE}\n{state_columns_block()}\n"
        # No fsync_after_insert, like the events table: a kill -9 loses nothing
        # that was written (the page cache survives the process); surviving a
        # power cut is ClickHouse's usual trade-off and would need fsync on
        # both tables (see sinks/exactly_once.py).
        "ENGINE = MergeTree\nORDER BY (topic, partition, last_offset)\nTTL toDateTime(at) + INTERVAL 30 DAY",
    ]


def cluster_statements(opts: Options = Options(), cluster: str = "{cluster}", fields: tuple[Field, ...] = FIELDS) -> list[str]:
    """DDL for a ClickHouse cluster: replicated local tables plus Distributed fronts.

    The sink inserts into `events` (Distributed) with
    distributed_foreground_insert=1, so an insert returns only once every
    shard has its rows and a retried batch (same token, same sharding by
    host_id, hence the same sub-blocks per shard) is deduplicated by each
    shard's ReplicatedMergeTree (replicated_deduplication_window).
    """
    db = opts.database
    on = f"ON CLUSTER '{cluster}'"
    zk = f"'/clickhouse/tables/{{shard}}/{db}/{{table}}'"
    return [
        f"CREATE DATABASE IF NOT EXISTS {db} {on}",
        f"CREATE TABLE IF NOT EXISTS {db}.{TABLE}_local {on}\n{_columns_block(fields)}\n"
        f"ENGINE = ReplicatedMergeTree({zk}, '{{replica}}')\nPARTITION BY {PARTITION_BY}\nORDER BY {ORDER_BY}"
        f"{_ttl_clause(opts.ttl_days)}\nSETTINGS replicated_deduplication_window = {int(opts.dedup_window)}, "
        f"{_PART_SETTINGS}",
        f"CREATE TABLE IF NOT EXISTS {db}.{TABLE} {on} AS {db}.{TABLE}_local\n"
        f"ENGINE = Distributed('{cluster}', {db}, {TABLE}_local, cityHash64(host_id))",
        f"CREATE TABLE IF NOT EXISTS {db}.{STATE_TABLE}_local {on}\n{state_columns_block()}\n"
        f"ENGINE = ReplicatedMergeTree({zk}, '{{replica}}')\nORDER BY (topic, partition, last_offset)\n"
        "TTL toDateTime(at) + INTERVAL 30 DAY",
        f"CREATE TABLE IF NOT EXISTS {db}.{STATE_TABLE} {on} AS {db}.{STATE_TABLE}_local\n"
        f"ENGINE = Distributed('{cluster}', {db}, {STATE_TABLE}_local, cityHash64(topic, partition))",
    ]


def migrate_statements(existing: dict[str, str], opts: Options = Options(), fields: tuple[Field, ...] = FIELDS,
                       table: str = TABLE, cluster: str | None = None) -> list[str]:
    """ALTERs that bring an existing events table up to the contract.

    `existing` maps column name -> ClickHouse type as system.columns reports
    it. Missing contract fields become ADD COLUMN (after their predecessor,
    so the column order follows FIELDS); an enum that gained symbols is
    widened with MODIFY COLUMN (Enum8 only accepts values it lists).
    Columns the contract does not know are left alone: dropping data is
    never automatic.
    """
    out = []
    table = f"{opts.database}.{table}" + (f" ON CLUSTER '{cluster}'" if cluster else "")
    prev = None
    present = set(existing)
    for f in fields:
        if f.name not in existing:
            after = f" AFTER {prev}" if prev in present else ""
            present.add(f.name)
            out.append(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column_def(f)}{after}")
        elif f.kind == "enum" and _normalise(existing[f.name]) != _normalise(column_type(f)):
            out.append(f"ALTER TABLE {table} MODIFY COLUMN {column_def(f)}")
        prev = f.name
    if "time" not in existing:
        out.append(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {TIME_COLUMN}")
    return out


STATE_TOPIC_ID = "topic_id String DEFAULT '' AFTER topic"  # added for sinks/incarnation.py


def state_migrate_statements(existing: set[str], opts: Options = Options(), table: str = STATE_TABLE,
                             cluster: str | None = None) -> list[str]:
    """ALTERs that bring an existing sink_batches table (its column names) up to date."""
    on = f" ON CLUSTER '{cluster}'" if cluster else ""
    if "topic_id" in existing:
        return []
    return [f"ALTER TABLE {opts.database}.{table}{on} ADD COLUMN IF NOT EXISTS {STATE_TOPIC_ID}"]


def _columns(client, db: str, table: str) -> dict[str, str]:
    return dict(client.query(
        "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = {t:String}",
        parameters={"db": db, "t": table},
    ).result_rows)


def _normalise(typ: str) -> str:
    return typ.replace(" ", "")


def ensure_schema(client, opts: Options = Options()) -> list[str]:
    """Create or migrate the schema through a clickhouse-connect client; returns the ALTERs it ran.

    Idempotent: running it again on an up-to-date store does nothing.
    On a cluster (events is a Distributed table made with cluster_statements)
    nothing is altered: the columns live in the replicated events_local
    tables on every node, which an ALTER of the Distributed front would not
    reach. The needed ALTERs are raised as ClusterSchemaOutdated for the
    operator to run ON CLUSTER.
    """
    engine = client.query(
        "SELECT engine FROM system.tables WHERE database = {db:String} AND name = {t:String}",
        parameters={"db": opts.database, "t": TABLE},
    ).result_rows
    if engine and engine[0][0] == "Distributed":
        rows = client.query(
            "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = {t:String}",
            parameters={"db": opts.database, "t": TABLE},
        ).result_rows
        existing = dict(rows)
        state = set(_columns(client, opts.database, STATE_TABLE))
        if migrate_statements(existing, opts) or state_migrate_statements(state, opts):
            raise ClusterSchemaOutdated(migrate_statements(existing, opts, table=f"{TABLE}_local", cluster="{cluster}")
                                        + migrate_statements(existing, opts, cluster="{cluster}")
                                        + state_migrate_statements(state, opts, f"{STATE_TABLE}_local", "{cluster}")
                                        + state_migrate_statements(state, opts, cluster="{cluster}"))
        return []
    for stmt in create_statements(opts):
        client.command(stmt)
    rows = client.query(
        "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = {t:String}",
        parameters={"db": opts.database, "t": TABLE},
    ).result_rows
    alters = migrate_statements({name: typ for name, typ in rows}, opts)
    create = client.query(
        "SELECT create_table_query FROM system.tables WHERE database = {db:String} AND name = {t:String}",
        parameters={"db": opts.database, "t": TABLE},
    ).result_rows[0][0]
    if _PART_SETTINGS not in create:  # a table made before the setting was chosen
        alters.append(f"ALTER TABLE {opts.database}.{TABLE} MODIFY SETTING {_PART_SETTINGS}")
    alters += state_migrate_statements(set(_columns(client, opts.database, STATE_TABLE)), opts)
    for stmt in alters:
        client.command(stmt)
    return alters


class ClusterSchemaOutdated(RuntimeError):
    def __init__(self, alters: list[str]):
        self.alters = alters
        super().__init__("the cluster's events table lacks contract columns; run (with your cluster's name): "
                         + "; ".join(alters))


if __name__ == "__main__":  # print the DDL: `python -m fdpass.schemas.clickhouse [--cluster NAME]`
    import sys

    if "--cluster" in sys.argv:
        name = sys.argv[sys.argv.index("--cluster") + 1]
        print(";\n\n".join(cluster_statements(cluster=name)) + ";")
    else:
        print(";\n\n".join(create_statements()) + ";")
