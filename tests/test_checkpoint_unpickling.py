"""Resuming never runs code a checkpoint names: whoever can write the run directory (a shared PVC, scratch space)
must not get code execution in the training job. Each planted file below would run ``touch <marker>`` if unpickled."""

from __future__ import annotations

import os
import pickle
import traceback

import pytest
import torch

from r1.types import CodeTest, Group, Reference, Sample


class _Planted:
    """What an attacker writes: unpickling it calls ``os.system``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_the_planted_object_runs_when_unpickled(tmp_path):
    """The probe itself works (so the refusals below are refusals, not a harmless file)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Planted(marker)))
    assert marker.exists()


def test_an_optimizer_file_naming_code_is_refused_and_nothing_runs(tiny_model, tmp_path):
    from r1.algo import GRPOLoss
    from tests.test_train_engine import _engine, synthetic_batch

    engine = _engine(tiny_model, with_reference=True)
    engine.train_step(synthetic_batch(8), GRPOLoss())
    engine.save(tmp_path / "ckpt", with_optimizer=True)
    _engine(tiny_model, with_reference=True).load(tmp_path / "ckpt")  # the real file loads (weights-only is enough)

    marker = tmp_path / "ran"
    state = torch.load(tmp_path / "ckpt" / "optimizer.pt", weights_only=True)
    state["scheduler"]["planted"] = _Planted(marker)
    torch.save(state, tmp_path / "ckpt" / "optimizer.pt")
    with pytest.raises(pickle.UnpicklingError, match="system"):
        _engine(tiny_model, with_reference=True).load(tmp_path / "ckpt")
    assert not marker.exists()


def test_the_buffers_groups_round_trip_through_json_and_an_old_pickle_is_not_read(tmp_path):
    groups = [
        Group(prompt_index=3, uid=11, reference=Reference(answer="42"), samples=[
            Sample(prompt_ids=[1, 2], response_ids=[5, 6, 7], rollout_logprobs=[-0.1, -2.5e-8, float("-inf")],
                   response_text="<think>x</think>", reward=1.0, reward_components={"accuracy": 1.0},
                   answer="42", finish_reason="stop", policy_version=4, token_versions=[4, 4, 5])]),
        Group(prompt_index=0, uid=12, reference=Reference(tests=(CodeTest(stdin="1\n", stdout="2"),
                                                                 CodeTest(assertion="f(1) == 2"))),
              samples=[], skipped="prompt_too_long"),
    ]
    import json

    back = [Group.from_json(d) for d in json.loads(json.dumps([g.to_json() for g in groups]))]
    assert back == groups  # dataclass equality: every field, floats bit for bit

    from r1.workers.rollout_buffer import RolloutBuffer

    marker = tmp_path / "ran"
    (tmp_path / "rollouts.pkl").write_bytes(pickle.dumps(_Planted(marker)))  # an older r1's file, or a planted one
    buffer = RolloutBuffer.__new__(RolloutBuffer)  # (only its loader is exercised: no pool behind it)
    from r1.data.prompts import PromptSampler

    buffer.sampler = PromptSampler(4, 0)
    state = {"sampler": buffer.sampler.state_dict(), "next_uid": 0, "queue": [], "requests": [], "ready": [],
             "attempts": [], "discarded_stale": 0, "redone_after_loss": 0, "dropped_uniform": 0}
    with pytest.raises(RuntimeError, match="pickle .* not loaded"):
        buffer.load_state_dict(state, tmp_path)
    assert not marker.exists()


def _dcp_checkpoint(path, extra=None):
    """A torch.distributed.checkpoint directory, the format Megatron's ``dist_checkpointing`` writes."""
    import torch.distributed.checkpoint as dcp

    state = {"w": torch.arange(6.0).reshape(2, 3), **(extra or {})}
    dcp.save(state, checkpoint_id=str(path), no_dist=True)
    return state


def test_a_megatron_checkpoint_whose_metadata_names_code_is_refused(tmp_path):
    from r1.engines.megatron.safe_checkpoint import UnsafeCheckpoint, check_metadata

    _dcp_checkpoint(tmp_path / "ok")
    check_metadata(tmp_path / "ok")  # torch's own metadata passes

    marker = tmp_path / "ran"
    (tmp_path / "ok" / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(UnsafeCheckpoint, match=r"\.metadata asks to build posix\.system"):
        check_metadata(tmp_path / "ok")
    assert not marker.exists()
    # and the same file through torch's own reader (what Megatron calls) does run it: the check is what stops it
    from torch.distributed.checkpoint import FileSystemReader

    with pytest.raises(AttributeError):  # (after it ran: os.system's return value is no Metadata)
        FileSystemReader(str(tmp_path / "ok")).read_metadata()
    assert marker.exists()


def test_a_megatron_checkpoints_object_item_naming_code_is_refused(tmp_path):
    """Non-tensor items (optimizer hyper-parameters, Megatron's common state) are read with ``torch.load(...,
    weights_only=False)`` by torch's load planner; within ``weights_only_loads`` they are read weights-only."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from r1.engines.megatron.safe_checkpoint import weights_only_loads

    marker = tmp_path / "ran"
    _dcp_checkpoint(tmp_path / "c", {"hyper": {"lr": 1e-3, "planted": _Planted(marker)}})
    target = {"w": torch.zeros(2, 3), "hyper": {"lr": 0.0, "planted": None}}
    with weights_only_loads(), pytest.raises(CheckpointException) as err:  # (a BaseException, per rank)
        dcp.load(target, checkpoint_id=str(tmp_path / "c"), no_dist=True)
    said = "".join(traceback.format_exception(err.value))
    assert "Weights only load failed" in said and "posix.system" in said
    assert not marker.exists() and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    try:  # without it, torch runs it
        dcp.load(target, checkpoint_id=str(tmp_path / "c"), no_dist=True)
    except CheckpointException:  # (whatever follows the planted call is beside the point)
        pass
    assert marker.exists()
