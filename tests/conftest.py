"""Shared pytest set-up. Fixtures of each subsystem live in their own plugin module."""

pytest_plugins = [
    "tests.fixtures_bpf",
    "tests.fixtures_kafka",
    "tests.fixtures_clickhouse",
    "tests.cprogs",
]
