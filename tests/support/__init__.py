"""Helpers the tests import: plain modules (fixtures live in tests/conftest.py)."""
