"""Micro-benchmarks run as scripts (`python -m dvd_serve.loadtests.benchmarks.<name>`): measured numbers printed
as a table, then one final JSON line. Never timed tests."""
