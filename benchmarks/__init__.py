"""Benchmarks: engine-level and end-to-end runs that print a table and write JSON."""
