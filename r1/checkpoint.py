"""Atomic, resumable checkpoints.

Layout under ``<run_dir>/checkpoints``::

    step_000050/            policy/ (HF safetensors + tokenizer), reference.safetensors, optimizer.pt,
                            rng_rank*.pt, driver_state.json
    latest                  text file naming the newest complete step directory

A checkpoint is written into ``step_N.tmp-<pid>`` and renamed into place only once complete, and ``latest`` is
replaced atomically after that: a kill at any moment leaves the previous checkpoint intact and ``latest`` valid.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / "driver_state.json").exists() else None

    def save(self, step: int, driver_state: dict, write_engine: Callable[[Path], None]) -> Path:
        """``write_engine(tmp_dir)`` writes the workers' part; then the driver state; then the atomic switch."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step_{step:06d}"
        tmp = self.root / f"{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_engine(tmp)
        (tmp / "driver_state.json").write_text(json.dumps(driver_state, indent=1))
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
            shutil.rmtree(final)
        tmp.rename(final)
        pointer_tmp = self.root / f"latest.tmp-{os.getpid()}"
        pointer_tmp.write_text(final.name)
        pointer_tmp.replace(self.root / "latest")
        _fsync_dir(self.root)
        self._prune(keep=final)
        return final

    def _prune(self, keep: Path) -> None:
        for stale in self.root.glob("step_*.tmp-*"):  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        complete = sorted(p for p in self.root.glob("step_*") if p.is_dir() and ".tmp-" not in p.name)
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def driver_state(path: Path) -> dict:
        return json.loads((path / "driver_state.json").read_text())
