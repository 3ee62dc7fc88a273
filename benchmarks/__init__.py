"""Measurements of gqla_compile (results as JSON + Markdown tables in benchmarks/results)."""
