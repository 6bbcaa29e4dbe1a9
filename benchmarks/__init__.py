"""Benchmarks for bridge."""
