"""Atomic, resumable checkpoints: at every moment of a save, a valid checkpoint can be found.

Layout under ``<run_dir>/checkpoints``::

    step_000050/            policy/ (HF safetensors + tokenizer), reference.safetensors, optimizer.pt (read with
                            weights_only=True), rng_rank*.json, rollouts.json, driver_state.json (written last: the
                            completeness mark). Nothing is unpickled on resume.
    latest                  text file naming the newest complete step directory

A save writes ``step_N.tmp-<pid>``, and only a complete one is renamed into place; ``latest`` is replaced atomically
after that. Re-saving a step that exists (the final save right after a periodic one) first renames the old copy
aside to ``step_N.old-<pid>``: between that rename and the next one ``latest`` names a missing directory, and
``latest()`` then takes the newest complete directory, the aside copy. A kill at any point therefore leaves either
the old or the new checkpoint readable.

Durable and self-cleaning: every file of a save is fsynced before the rename that makes it a checkpoint (a power cut
cannot leave a complete-looking directory of empty files). What a killed save left (``.tmp`` directories, an
``.old`` copy whose step is complete again) is removed *before* the next save writes anything, and a save that fails
(ENOSPC, a worker error) removes its own ``.tmp``: a requeued run on a nearly full disk does not fail again on the
space its dead attempt holds.

Resume (``resume``) tries the checkpoints newest first: one that cannot be loaded (a truncated file, an unsafe
pickle, a missing tensor) is reported and the one before it is used - never a fresh start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

STATE_FILE = "driver_state.json"


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path``, then every directory (deepest first): the data and the names are on disk.
    The workers call it for what they wrote (on a shared filesystem only the writer's client can flush it); the
    driver for the whole save."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


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
        return next(iter(self.candidates()), None)

    def candidates(self) -> list[Path]:
        """Every complete checkpoint, newest first (a copy set aside for a re-save ranks after its step's own)."""
        complete = [p for p in self.root.glob("step_*") if ".tmp-" not in p.name and _complete(p)]
        return sorted(complete, key=lambda p: (p.name.split(".")[0], ".old-" not in p.name, p.stat().st_mtime),
                      reverse=True)

    def resume(self, load: Callable[[Path, dict], None]) -> tuple[Path, dict] | None:
        """Load the newest checkpoint that loads: ``load(path, driver_state)`` for each, newest first, until one
        returns; a checkpoint that raises (unreadable driver state, a truncated or unsafe file, a missing tensor) is
        logged with its reason and the one before it is tried. None where there is nothing to resume from
        (``require_latest_for_resume``); an error naming every checkpoint and why, where none loads."""
        first = self.require_latest_for_resume()
        if first is None:
            return None
        tried: list[str] = []
        for path in [first, *(p for p in self.candidates() if p != first)]:
            try:
                state = self.driver_state(path)
                load(path, state)
            except Exception as err:
                if type(err).__name__ in ("RayActorError", "ActorDiedError", "OutOfMemoryError"):
                    raise  # a dead worker or no memory: no older checkpoint would fare better
                reason = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
                log.error("checkpoint %s cannot be loaded (%s); trying the one before it", path, reason)
                tried.append(f"{path.name}: {reason}")
                continue
            if tried:
                log.warning("resumed from %s: newer checkpoints could not be loaded (%s)", path, "; ".join(tried))
            return path, state
        raise CheckpointError(f"resume=true, but no checkpoint in {self.root} loads:\n  " + "\n  ".join(tried))

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
        self._clear_leftovers()
        final = self.root / f"step_{step:06d}"
        tmp = self.root / f"{final.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            write(tmp)
            (tmp / STATE_FILE).write_text(json.dumps(driver_state, indent=1))
            fsync_tree(tmp)
        except Exception:  # (ENOSPC, a worker's error) this save's space goes back; a kill leaves it to the next
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        aside = None
        if final.exists():  # re-saving the same step: keep the old copy readable until the new one is in place
            aside = self.root / f"{final.name}.old-{os.getpid()}"
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        pointer_tmp = self.root / f"latest.tmp-{os.getpid()}"
        with open(pointer_tmp, "w") as f:
            f.write(final.name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, self.root / "latest")
        _fsync_dir(self.root)
        if aside is not None:
            shutil.rmtree(aside)
        self._prune(keep=final)
        return final

    def _clear_leftovers(self) -> None:
        """What killed saves left: their ``.tmp`` directories and pointer files, and ``.old`` copies whose step is
        complete again (an ``.old`` copy that is its step's only complete one stays: it may be the newest)."""
        for stale in self.root.glob("step_*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in self.root.glob("latest.tmp-*"):
            stale.unlink(missing_ok=True)
        for aside in self.root.glob("step_*.old-*"):
            if _complete(self.root / aside.name.split(".")[0]):
                shutil.rmtree(aside, ignore_errors=True)

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
