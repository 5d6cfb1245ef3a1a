"""Checkpoints are atomic: a failure mid-save leaves the previous one intact and `latest` valid."""

import os

import pytest
import torch

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


def test_every_file_of_a_save_is_on_disk_before_its_rename_makes_it_the_checkpoint(tmp_path, monkeypatch):
    """A power cut after the rename must not find a complete-looking directory of empty files: each file (the
    workers' and the driver state) and the ``latest`` pointer are fsynced before the rename that publishes them."""
    events: list[tuple] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(src), str(dst)))
        real_rename(src, dst)

    def replace(src, dst):
        events.append(("rename", str(src), str(dst)))
        real_replace(src, dst)

    def write(d):
        (d / "policy").mkdir()
        (d / "policy" / "model.safetensors").write_bytes(b"w" * 4096)
        (d / "optimizer.pt").write_bytes(b"o" * 4096)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    final = CheckpointManager(tmp_path).save(7, {"step": 7}, write)
    published = {e[1]: i for i, e in enumerate(events) if e[0] == "rename"}
    [tmp] = [src for src, i in published.items() if events[i][2] == str(final)]
    [pointer] = [src for src, i in published.items() if events[i][2] == str(tmp_path / "latest")]
    synced = {e[1]: i for i, e in enumerate(events) if e[0] == "fsync"}
    files = [str(p.relative_to(final)) for p in final.rglob("*") if p.is_file()]
    assert sorted(files) == ["driver_state.json", "optimizer.pt", "policy/model.safetensors"]
    for f in files:
        assert synced.get(f"{tmp}/{f}", len(events)) < published[tmp], f"{f} was not fsynced before the rename"
    assert synced.get(pointer, len(events)) < published[pointer], "'latest' was not fsynced before it replaced"


def test_a_checkpoint_that_cannot_load_is_reported_and_the_one_before_it_is_resumed(tmp_path, caplog):
    from r1.checkpoint import CheckpointError

    mgr = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        mgr.save(step, {"step": step}, _writer(str(step)))
    (tmp_path / "step_000003" / "driver_state.json").write_text('{"step": 3, "buf')  # truncated by a crash
    loaded = []

    def load(path, state):
        if (path / "weights.bin").read_text() == "2":
            raise RuntimeError("checkpoint step_000002 does not match the model: missing ['lm_head.weight']")
        loaded.append((path.name, state))

    with caplog.at_level("ERROR", logger="r1.checkpoint"):
        path, state = mgr.resume(load)
    assert (path.name, state) == ("step_000001", {"step": 1}) and loaded == [("step_000001", {"step": 1})]
    said = caplog.text
    assert "step_000003" in said and "JSONDecodeError" in said
    assert "step_000002" in said and "missing ['lm_head.weight']" in said

    def nothing_loads(path, state):
        raise ValueError(f"bad {path.name}")

    with pytest.raises(CheckpointError, match="no checkpoint in .* loads") as err:
        mgr.resume(nothing_loads)
    assert all(f"step_00000{s}" in str(err.value) for s in (1, 2, 3))


@pytest.fixture
def small_disk(tmp_path):
    """Mount a size-limited tmpfs (needs root, as CI and this project's containers have): ``mount(size)``."""
    import subprocess

    mounted = []

    def mount(size: int):
        path = tmp_path / "disk"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              check=False, capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"a full disk is made by mounting a small tmpfs, which needs root: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    import gc

    gc.collect()  # (tensors mapped from the disk's files)
    for path in mounted:
        if subprocess.run(["umount", str(path)], check=False).returncode:
            subprocess.run(["umount", "--lazy", str(path)], check=False)


def _du(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _fill_until_free(disk, free: int):
    """Another tenant's data: the disk keeps ``free`` bytes."""
    st = os.statvfs(disk)
    (disk / "ballast").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - free))


def test_a_full_disk_mid_save_keeps_the_last_checkpoint_and_the_requeued_run_saves_again(
        tiny_model, tmp_path, small_disk):
    """ENOSPC in the middle of a real engine's save: the previous checkpoint stays the one found and loads exactly;
    the failed save gives its space back; and a requeued run whose dead attempt left a partial save behind (a kill
    cannot clean up) clears it before writing, so it fits where it would otherwise fail again."""
    import shutil

    from r1.algo import GRPOLoss
    from tests.test_train_engine import _engine, synthetic_batch

    engine = _engine(tiny_model, with_reference=True)
    engine.train_step(synthetic_batch(8), GRPOLoss())

    def write(d):
        engine.save(d, with_optimizer=True)

    size = _du(CheckpointManager(tmp_path / "probe").save(1, {"step": 1}, write))
    disk = small_disk(int(2.5 * size) // 4096 * 4096)
    mgr = CheckpointManager(disk, keep_last=1)
    first = mgr.save(1, {"step": 1}, write)
    saved = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    engine.train_step(synthetic_batch(8, seed=1), GRPOLoss())

    _fill_until_free(disk, int(0.6 * size))
    with pytest.raises((OSError, RuntimeError)):  # (torch.save reports ENOSPC as "[enforce fail ...] unexpected pos")
        mgr.save(2, {"step": 2}, write)
    assert sorted(p.name for p in disk.iterdir()) == ["ballast", "latest", "step_000001"]  # no partial save left
    assert mgr.latest() == first
    fresh = _engine(tiny_model, with_reference=True)
    fresh.load(first)
    for name, p in fresh.model.named_parameters():
        assert torch.equal(p, saved[name]), name

    (disk / "ballast").unlink()  # the operator frees the disk; the job is requeued
    dead = disk / "step_000002.tmp-424242"  # what a save killed on the full disk left behind
    shutil.copytree(first, dead)
    (dead / "driver_state.json").unlink()
    assert os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize < size  # without clearing it, no room
    again = CheckpointManager(disk, keep_last=1).save(2, {"step": 2}, write)
    assert sorted(p.name for p in disk.iterdir()) == ["latest", "step_000002"]
    assert CheckpointManager(disk).latest() == again
    fresh.load(again)
    for name, p in fresh.model.named_parameters():
        assert torch.equal(p, dict(engine.model.named_parameters())[name]), name
