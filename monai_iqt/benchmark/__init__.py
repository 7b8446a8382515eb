"""Benchmarks that print tables: ``python -m monai_iqt.benchmark {memory,inference} --help``."""
