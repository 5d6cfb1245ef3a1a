"""Model sources: a local HF checkpoint, or the tiny offline model of the embedded default."""
