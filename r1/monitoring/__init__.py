"""Metrics out of the driver: W&B (or nothing), a JSONL file, and the live progress line in the terminal."""
