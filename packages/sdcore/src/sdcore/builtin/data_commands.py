"""Placeholder until this built-in lands."""
