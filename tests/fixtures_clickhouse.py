"""Fixtures for clickhouse tests."""
