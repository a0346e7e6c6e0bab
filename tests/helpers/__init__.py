"""Fixtures and tiny models the tests share."""
