"""Fixtures for kafka tests."""
