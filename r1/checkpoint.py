"""Atomic, resumable checkpoints: at every moment of a save, a valid checkpoint can be found.

Layout under ``<run_dir>/checkpoints``::

    step_000050/            policy/ (HF safetensors + tokenizer), reference.safetensors, optimizer.pt,
                            rng_rank*.pt, rollouts.pkl, driver_state.json (written last: the completeness mark)
    latest                  text file naming the newest complete step directory

A save writes ``step_N.tmp-<pid>``, and only a complete one is renamed into place; ``latest`` is replaced atomically
after that. Re-saving a step that exists (the final save right after a periodic one) first renames the old copy
aside to ``step_N.old-<pid>``: between that rename and the next one ``latest`` names a missing directory, and
``latest()`` then takes the newest complete directory, the aside copy. A kill at any point therefore leaves either
the old or the new checkpoint readable; stale ``.tmp``/``.old`` directories are removed by the next successful save.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

STATE_FILE = "driver_state.json"


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names; if a kill mid-save left it naming nothing (or left no pointer), the
        newest complete checkpoint, counting a copy set aside for a re-save. None if there is none."""
        pointer = self.root / "latest"
        if pointer.exists() and _complete(named := self.root / pointer.read_text().strip()):
            return named
        complete = [p for p in self.root.glob("step_*") if ".tmp-" not in p.name and _complete(p)]
        return max(complete, key=lambda p: (p.name.split(".")[0], p.stat().st_mtime), default=None)

    def require_latest_for_resume(self) -> Path | None:
        """``latest()`` for ``resume=true``: None only where there is nothing at all to resume from (no checkpoint
        directory, or only what a save killed before it finished left); a checkpoints directory with other content
        but no valid checkpoint is an error that says what it found (never a fresh start)."""
        found = self.latest()
        # (a save killed before its rename leaves only a .tmp- directory: that is not a checkpoint, and nothing else)
        if found is not None or not self.root.exists() or all(".tmp-" in p.name for p in self.root.iterdir()):
            return found
        pointer = self.root / "latest"
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in self.root.iterdir())
        said = f"'latest' names {pointer.read_text().strip()!r}, which" if pointer.exists() else "there is no 'latest'"
        raise CheckpointError(
            f"resume=true, but {self.root} holds no valid checkpoint ({said} is missing or has no {STATE_FILE}).\n"
            f"Found: {', '.join(names)}.\nPoint run_dir at another run, restore a checkpoint there, or move the "
            f"directory away to start afresh (r1 never silently restarts a run you asked it to resume)."
        )

    def save(self, step: int, driver_state: dict, write: Callable[[Path], None]) -> Path:
        """``write(tmp_dir)`` writes the workers' part; then the driver state; then the atomic switch."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step_{step:06d}"
        tmp = self.root / f"{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        (tmp / STATE_FILE).write_text(json.dumps(driver_state, indent=1))
        _fsync_dir(tmp)
        aside = None
        if final.exists():  # re-saving the same step: keep the old copy readable until the new one is in place
            aside = self.root / f"{final.name}.old-{os.getpid()}"
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        pointer_tmp = self.root / f"latest.tmp-{os.getpid()}"
        pointer_tmp.write_text(final.name)
        os.replace(pointer_tmp, self.root / "latest")
        _fsync_dir(self.root)
        if aside is not None:
            shutil.rmtree(aside)
        self._prune(keep=final)
        return final

    def _prune(self, keep: Path) -> None:
        for stale in [*self.root.glob("step_*.tmp-*"), *self.root.glob("step_*.old-*")]:  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
        complete = sorted(p for p in self.root.glob("step_*") if p.is_dir() and "." not in p.name)
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def driver_state(path: Path) -> dict:
        return json.loads((path / STATE_FILE).read_text())
