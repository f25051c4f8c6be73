"""Fixtures for bpf tests."""
