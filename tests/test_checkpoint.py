"""Checkpoints are atomic: a failure mid-save leaves the previous one intact and `latest` valid."""

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
