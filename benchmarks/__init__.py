"""Benchmarks: log parsers, acceptance verdicts, reports and performance scripts."""
