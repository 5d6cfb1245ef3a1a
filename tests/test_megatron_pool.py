"""``trainer=megatron`` through the real driver and Ray pools: a TP=2 training pool, weight sync to the rollout pool,
sharded checkpoints and exact resume (also at another TP size)."""

from __future__ import annotations

import json
import shutil

import pytest
import ray
import torch
from safetensors.torch import load_file

from r1.driver import run
from r1.inputs import prepare_model
from tests.conftest import TINY, compose, pools

pytestmark = pytest.mark.slow

# two KV heads: tensor parallelism splits them
TINY_TP2 = TINY + ["model.tiny.num_kv_heads=2"]


@pytest.fixture(scope="module")
def tiny_tp2(cache_dir) -> str:
    return prepare_model(compose(TINY_TP2 + [f"cache_dir={cache_dir}", "run_dir=unused"]))


def _cfg(cache_dir, run_dir, total_steps, tp=2, resume=False, extra=()):
    return compose(TINY_TP2 + [
        f"cache_dir={cache_dir}", f"run_dir={run_dir}", "trainer=megatron", f"trainer.num_workers={tp}",
        f"trainer.megatron.tensor_parallel={tp}", "trainer.torch_threads=1", f"trainer.total_steps={total_steps}",
        f"resume={str(resume).lower()}", "rollout.num_workers=1", "algo.group_size=4", "algo.prompts_per_step=4",
        "eval.every_steps=0", "checkpoint.every_steps=1", "checkpoint.keep_last=5", "trainer.lr=1e-3",
        "trainer.megatron.micro_batch_tokens=64", "rollout.length_schedule=[{from_step: 0, max_tokens: 12}]",
        "eval.max_new_tokens=12", "eval.k=2", "eval.max_problems=4",
        "reward.terms=[{name: accuracy, weight: 1.0}, {name: 'tests.test_end_to_end:digit_reward', weight: 1.0}]",
        *extra,
    ])


def _policy(run_dir, step):
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "policy" / "model.safetensors"))


def test_weight_sync_from_a_tensor_parallel_pool_is_bit_exact(ray_local, tiny_tp2, cache_dir, tmp_path):
    """After a training step at TP=2, the rollout workers hold exactly the HF weights the pool exports (gathered
    from both shards), and the exported directory loads with ``from_pretrained`` and gives Megatron's log-probs."""
    from transformers import AutoModelForCausalLM

    from r1.algo import GRPOLoss
    from r1.engines.hf_train import response_logprobs
    from tests.test_megatron_engine import _batch

    cfg = _cfg(cache_dir, tmp_path / "run", 1)
    with pools(cfg, tiny_tp2) as (train, rollout, sync):
        assert (train.dp_size, train.collective) == (1, True)
        loss = GRPOLoss(clip_low=0.2, clip_high=0.2, agg="token_mean", kl_coef=0.0, kl_kind="k3",
                        kl_in_loss=False, temperature=1.0, norm_constant=1.0)
        train.train_step(_batch(), loss)
        sync.push(1)
        train.save(str(tmp_path / "ckpt"), with_optimizer=False)
        logprobs = train.compute_logprobs(_batch(), temperature=1.0, reference=False)
        # what each rollout worker received for version 1 (staged until a request made at version 1 starts)
        received = [ray.get(a.__ray_call__.remote(lambda w: dict(w.engine._receiver._staged[1][0]))) for a in rollout.actors]
    exported = load_file(str(tmp_path / "ckpt" / "policy" / "model.safetensors"))
    initial = load_file(f"{tiny_tp2}/model.safetensors")
    for weights in received:
        assert weights.keys() == exported.keys()
        for name, tensor in weights.items():
            assert tensor.dtype == exported[name].dtype and torch.equal(tensor, exported[name]), name
    assert any(not torch.equal(exported[n], initial[n]) for n in initial)  # the step moved the weights
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "policy", dtype=torch.float32)
    hf_logprobs, _ = response_logprobs(model.eval(), _batch(), 1.0)
    mask = _batch().response_mask.bool()
    torch.testing.assert_close(hf_logprobs[mask], logprobs[mask], atol=1e-5, rtol=1e-5)


def _resume_from(straight, run_dir, step):
    """A run directory whose only checkpoint is ``straight``'s at ``step`` (a run stopped right after saving it)."""
    (run_dir / "checkpoints").mkdir(parents=True)
    name = f"step_{step:06d}"
    shutil.copytree(straight / "checkpoints" / name, run_dir / "checkpoints" / name)
    (run_dir / "checkpoints" / "latest").write_text(name)


def test_megatron_runs_the_default_experiment_and_resumes_exactly(ray_local, tiny_tp2, cache_dir, tmp_path):
    """Three steps straight; then resumes from its step-2 checkpoint in fresh pools: the same step-3 policy bit for
    bit at the same TP size, and within fp32 tolerance when the resumed pool has another TP size (the sharded
    checkpoint is re-split)."""
    straight = tmp_path / "straight"
    assert run(_cfg(cache_dir, straight, 3))["step"] == 3
    metrics = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "reward/mean" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    # the trainer's log-probs of the rollouts equal the rollout engine's: the synced weights are the trained ones
    assert all(m["train/is_log_ratio_abs_mean"] < 1e-4 for m in steps)
    assert not torch.equal(_policy(straight, 1)["model.norm.weight"], _policy(straight, 3)["model.norm.weight"])
    want = _policy(straight, 3)

    for tp in (2, 1):
        resumed = tmp_path / f"resumed_tp{tp}"
        _resume_from(straight, resumed, 2)
        assert run(_cfg(cache_dir, resumed, 3, tp=tp, resume=True))["step"] == 3
        got = _policy(resumed, 3)
        assert got.keys() == want.keys()
        for name in want:
            if tp == 2:
                assert torch.equal(got[name], want[name]), name
            else:
                torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
