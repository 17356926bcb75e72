"""Benchmarks, run with `make bench`; never asserted in tests."""
