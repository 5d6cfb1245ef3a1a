"""Checkpoints are atomic: a failure mid-save leaves the previous one intact and `latest` valid."""

import os

import pytest

from r1.checkpoint import CheckpointManager


def _writer(payload: str):
    def write(d):
        (d / "weights.bin").write_text(payload)
    return write


def test_kill_mid_save_keeps_previous_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    first = mgr.save(1, {"step": 1}, _writer("one"))

    def crash(d):
        (d / "weights.bin").write_text("half")
        raise KeyboardInterrupt("killed mid-save")

    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, {"step": 2}, crash)
    assert mgr.latest() == first
    assert (first / "weights.bin").read_text() == "one"
    assert CheckpointManager.driver_state(first) == {"step": 1}
    assert not (tmp_path / "step_000002").exists()
    # the next successful save cleans up the partial directory
    mgr.save(3, {"step": 3}, _writer("three"))
    assert not list(tmp_path.glob("*.tmp-*"))
    assert mgr.latest().name == "step_000003"


def test_keep_last_prunes_old_checkpoints(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 5):
        mgr.save(step, {"step": step}, _writer(str(step)))
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000003", "step_000004"]


def test_no_checkpoint_yet(tmp_path):
    assert CheckpointManager(tmp_path).latest() is None


class _KilledHere(BaseException):
    """Stands for SIGKILL: nothing after it runs, no cleanup (a BaseException, so no `except Exception` eats it)."""


def _count_or_kill(monkeypatch, kill_at: int | None) -> list[str]:
    """Make every filesystem mutation a save performs a numbered point; raise at point ``kill_at``."""
    import os
    import shutil
    from pathlib import Path

    calls: list[str] = []

    def wrap(owner, name):
        real = getattr(owner, name)

        def op(*args, **kwargs):
            calls.append(name)
            if kill_at is not None and len(calls) - 1 == kill_at:
                raise _KilledHere(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, op)

    for owner, name in [(os, "rename"), (os, "replace"), (os, "fsync"), (shutil, "rmtree"), (Path, "mkdir"),
                        (Path, "write_text")]:
        wrap(owner, name)
    return calls


def _content(ckpt) -> tuple[str, dict]:
    return (ckpt / "weights.bin").read_text(), CheckpointManager.driver_state(ckpt)


@pytest.mark.parametrize("resave", [True, False], ids=["re-save-same-step", "save-next-step"])
def test_a_kill_at_any_point_of_a_save_leaves_a_valid_checkpoint(tmp_path, monkeypatch, resave):
    """Every filesystem operation of a save is a place a kill can land: after each, the old or the new checkpoint
    (never a mix, never nothing) is what `latest()` finds, and a later save cleans up."""
    new_step = 2 if resave else 3

    def prepare(root):
        mgr = CheckpointManager(root, keep_last=2)
        mgr.save(1, {"step": 1}, _writer("one"))
        mgr.save(2, {"step": 2}, _writer("two"))
        return mgr

    with monkeypatch.context() as m:  # how many points does a save have?
        prepare(tmp_path / "count")
        calls = _count_or_kill(m, None)
        CheckpointManager(tmp_path / "count", keep_last=2).save(new_step, {"step": new_step, "v": "new"},
                                                                _writer("new"))
    assert len(calls) >= 8, calls

    for point in range(len(calls)):
        root = tmp_path / f"kill_at_{point}"
        prepare(root)
        with monkeypatch.context() as m:
            _count_or_kill(m, point)
            with pytest.raises(_KilledHere):
                CheckpointManager(root, keep_last=2).save(new_step, {"step": new_step, "v": "new"}, _writer("new"))
        found = CheckpointManager(root, keep_last=2).latest()  # a fresh process looks
        assert found is not None, f"killed at {calls[point]} (point {point}): no checkpoint found"
        assert _content(found) in [("two", {"step": 2}), ("new", {"step": new_step, "v": "new"})], point
        mgr = CheckpointManager(root, keep_last=2)
        mgr.save(4, {"step": 4}, _writer("four"))  # the run goes on: leftovers of the killed save are cleaned
        assert not list(root.glob("*.tmp-*")) and not list(root.glob("*.old-*"))
        assert _content(mgr.latest()) == ("four", {"step": 4})


def test_resume_from_a_directory_without_a_valid_checkpoint_is_an_error(tmp_path):
    from r1.checkpoint import CheckpointError

    assert CheckpointManager(tmp_path / "absent").require_latest_for_resume() is None  # a new run: start afresh
    (tmp_path / "empty").mkdir()
    assert CheckpointManager(tmp_path / "empty").require_latest_for_resume() is None
    killed = CheckpointManager(tmp_path / "killed")  # the run's first save died midway: nothing was ever saved

    def dies(path):
        (path / "policy").mkdir()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        killed.save(1, {"step": 1}, dies)
    assert [p.name for p in killed.root.iterdir()] == [f"step_000001.tmp-{os.getpid()}"]
    assert killed.require_latest_for_resume() is None  # a requeued job starts afresh instead of failing forever
    broken = tmp_path / "broken"
    (broken / "step_000005").mkdir(parents=True)  # a checkpoint without its driver state
    (broken / "latest").write_text("step_000005")
    with pytest.raises(CheckpointError, match="holds no valid checkpoint") as err:
        CheckpointManager(broken).require_latest_for_resume()
    assert "step_000005" in str(err.value) and "driver_state.json" in str(err.value)
