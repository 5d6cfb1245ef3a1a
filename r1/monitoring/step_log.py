"""Append-only JSONL files keyed by step (``metrics.jsonl``, ``groups.jsonl``), with one rule for resume.

A run killed after logging step 3 with its last checkpoint at step 2 redoes step 3 when resumed. So on resume every
row of a step after the checkpoint is dropped before appending: each step appears once, whatever was killed when.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO


def open_step_log(path: Path, resumed_step: int | None) -> IO[str]:
    """``path`` opened for appending; rows with ``step > resumed_step`` removed first when resuming."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if resumed_step is not None and path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resumed_step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(path)
    return path.open("a")
