"""Preprocessing: jsonl/parquet corpora to Megatron .bin/.idx."""
