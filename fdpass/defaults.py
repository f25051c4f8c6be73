"""Defaults every command shares, defined once: where events go and live."""

from __future__ import annotations

from fdpass.schemas.clickhouse import DATABASE, TABLE

TOPIC = "fdpass.events"                  # Kafka topic of `collect --kafka` and `sink`
SPOOL_DIR = "/var/lib/fdpass/spool"      # where `collect --kafka` keeps events Kafka cannot take
STORE_DIR = "/var/lib/fdpass/store"      # the embedded ClickHouse of `run`, `sink` and `query`
STORE_DSN = f"chdb://{STORE_DIR}"
EVENTS_TABLE = f"{DATABASE}.{TABLE}"     # fdpass.events
