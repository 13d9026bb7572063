"""Rendering results: rich tables and JSON records."""
