"""Two GRPO steps on real Ray pools (1 trainer + 2 rollout workers, gloo weight sync), checkpoint, exact resume."""

import json
import os
import shutil
import subprocess

import pytest
import ray
import torch
from safetensors.torch import load_file

from r1.data.tokens import TokenRules
from r1.driver import run, sampling_params
from r1.inputs import prepare_data
from r1.types import CodeTest, Reference
from r1.workers.rollout_buffer import outstanding_uids
from tests.conftest import TINY, compose, pools
from tests.test_checkpoint_unpickling import _Planted

pytestmark = pytest.mark.slow


def digit_reward(response: str, reference: str) -> float:
    return sum(c.isdigit() for c in response) / max(1, len(response))


HELD_UID = 63500  # a sandbox user whose whole process limit the stop test holds
_scored = 0


def digits_then_a_sandbox_that_cannot_start(response: str, reference: str) -> float:
    """digit_reward for the 8 responses of step 1; from then on every response first runs a program in the real
    sandbox as HELD_UID, which cannot start (its process limit is taken): SandboxUnavailable, as a coding problem's
    accuracy raises it."""
    global _scored
    _scored += 1
    if _scored > 8:
        from r1.rewards.sandbox import Sandbox, SandboxLimits

        with Sandbox(SandboxLimits(processes=2), uid=HELD_UID) as box:
            box.run("print(1)")
    return digit_reward(response, reference)


def _cfg(cache_dir, run_dir, total_steps, resume=False, extra=()):
    return compose(
        TINY
        + [
            f"cache_dir={cache_dir}", f"run_dir={run_dir}", f"trainer.total_steps={total_steps}",
            f"resume={str(resume).lower()}", "trainer.num_workers=1", "rollout.num_workers=2",
            "algo.group_size=4", "algo.prompts_per_step=4", "eval.k=2", "eval.max_problems=4",
            "eval.every_steps=0", "checkpoint.every_steps=1", "checkpoint.keep_last=5",
            "rollout.length_schedule=[{from_step: 0, max_tokens: 12}]", "eval.max_new_tokens=12",
            "trainer.lr=1e-3",
            # an untrained model never earns accuracy/format: a graded user term gives GRPO a signal
            (
                "reward.terms=[{name: accuracy, weight: 1.0}, {name: format, weight: 1.0},"
                " {name: 'tests.test_end_to_end:digit_reward', weight: 1.0}]"
            ),
            *extra,
        ]
    )


def _policy(run_dir, step):
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "policy" / "model.safetensors"))


def test_two_steps_checkpoint_and_exact_resume_past_a_planted_checkpoint(ray_local, tiny_model, cache_dir, tmp_path):
    straight = tmp_path / "straight"
    out = run(_cfg(cache_dir, straight, total_steps=2))
    assert out["step"] == 2
    metrics = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "reward/mean" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for key in ("reward/accuracy", "reward/format", "train/kl", "train/clip_fraction", "train/grad_norm",
                "time/sync_s", "perf/gen_tokens_per_s", "response/length_mean", "train/entropy"):
        assert key in steps[0], key
    assert {"eval/pass@1", "eval/cons@2", "eval/format_rate"} <= set(metrics[0])
    # training moved the weights, and every checkpoint is a loadable HF model
    assert not torch.equal(_policy(straight, 1)["model.norm.weight"], _policy(straight, 2)["model.norm.weight"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(straight / "checkpoints" / "step_000002" / "policy")
    AutoTokenizer.from_pretrained(straight / "checkpoints" / "step_000002" / "policy")

    # Stop after 1 step, resume to 2: same data position, same weights as the uninterrupted run.
    resumed = tmp_path / "resumed"
    run(_cfg(cache_dir, resumed, total_steps=1))
    state = json.loads((resumed / "checkpoints" / "step_000001" / "driver_state.json").read_text())
    assert state["step"] == 1 and state["buffer"]["sampler"]["index"] == 4
    assert state["buffer"]["next_uid"] == 4 and outstanding_uids(state["buffer"]) == []  # on-policy, final step
    # a newer checkpoint someone planted (the straight run's step 2, its optimizer file naming code): refused, and
    # the run resumes from the checkpoint before it
    planted = resumed / "checkpoints" / "step_000002"
    shutil.copytree(straight / "checkpoints" / "step_000002", planted)
    marker = tmp_path / "planted_code_ran"
    optimizer = torch.load(planted / "optimizer.pt", weights_only=True)
    optimizer["scheduler"]["x"] = _Planted(marker)
    torch.save(optimizer, planted / "optimizer.pt")
    (resumed / "checkpoints" / "latest").write_text(planted.name)
    out = run(_cfg(cache_dir, resumed, total_steps=2, resume=True))
    assert not marker.exists()
    assert out["step"] == 2
    a, b = _policy(straight, 2), _policy(resumed, 2)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    resumed_steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()
                     if "reward/mean" in x]
    assert resumed_steps == [1, 2]  # the resumed run continued at step 2, it did not redo 1


def test_llama_tokens_through_rollout_training_and_evaluation(ray_local, tiny_llama, cache_dir, tmp_path):
    """A tokenizer with BOS and no pad token (Llama 3): prompts keep their BOS in rollouts and evaluation, batches
    pad with EOS, and the trainer's log-probs of the rollouts equal the rollout engine's."""
    cfg = _cfg(cache_dir, tmp_path / "llama", total_steps=2, extra=["model=tiny_llama", "eval.every_steps=0"])
    run(cfg)
    metrics = [json.loads(line) for line in (tmp_path / "llama" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "reward/mean" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(m["train/is_log_ratio_abs_mean"] < 1e-4 for m in steps)  # |log pi_trainer - log pi_rollout|
    assert [m["step"] for m in metrics if "eval/pass@1" in m] == [0, 2]

    bos = TokenRules.load(tiny_llama).bos_id
    with pools(cfg, tiny_llama) as (_, rollout, _sync):
        problems = [(i, p.prompt, p.reference) for i, p in enumerate(prepare_data(cfg)[1].problems[:2])]
        code = Reference(tests=(CodeTest(stdin="3\n", stdout="6\n"),))  # a coding problem in the same request
        problems.append((2, "Write a program that doubles n.", code))
        out = ray.get(rollout.submit(0, problems, sampling_params(cfg, 0, seed=1), [0, 1, 2], 0))
        for group in out.groups:
            assert all(s.prompt_ids[0] == bos and s.prompt_ids.count(bos) == 1 for s in group.samples)
        # the coding problem's reference travelled with its group; the untrained model wrote no program: counted
        assert out.groups[2].reference == code and [s.answer for s in out.groups[2].samples] == [None] * 4
        assert out.totals.sandbox == {"no_program": cfg.algo.group_size}
        # what a trained model writes, scored by that worker as its rollouts are: in its own process, each program in
        # the sandbox (a correct one, a wrong one, one that tries the network)
        texts = [f"<think>read n</think>\n<answer>\n```python\n{program}\n```\n</answer>" for program in (
            "print(int(input()) * 2)", "print(int(input()) + 1)",
            "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\nprint(6)")]
        result, failed = ray.get(rollout.actors[0].__ray_call__.remote(
            lambda worker: worker.scorer.score(texts, [code] * 3, ["Write a program that doubles n."] * 3, 3)))
        assert failed == {} and result.components["accuracy"] == [1.0, 0.0, 0.0]
        assert result.answers[0] == "print(int(input()) * 2)"


@pytest.mark.skipif(os.geteuid() != 0, reason="holds processes as the sandbox's user (run as root)")
def test_a_sandbox_that_cannot_start_stops_the_run_loudly_and_loses_nothing(ray_local, tiny_model, cache_dir,
                                                                             tmp_path, monkeypatch):
    """Mid-run, a rollout worker's sandbox cannot start: the run does not train on zero rewards. It stops with the
    cause in its message, step 1's checkpoint holds every prompt still owed (the failed request's included), and
    the error says how to continue."""
    holders = [subprocess.Popen(["sleep", "300"], user=HELD_UID, group=HELD_UID) for _ in range(2)]
    run_dir = tmp_path / "stopped"
    cfg = _cfg(cache_dir, run_dir, total_steps=5, extra=[
        "rollout.num_workers=1", "algo.prompts_per_step=2", "eval.at_start=false",
        "reward.terms=[{name: 'tests.test_end_to_end:digits_then_a_sandbox_that_cannot_start', weight: 1.0}]"])
    try:
        with pytest.raises(RuntimeError) as caught:
            run(cfg)
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
    message = str(caught.value)
    assert message.startswith("stopped at step 1: ")
    assert "Resource temporarily unavailable" in message and f"uid {HELD_UID} holds 2 tasks" in message
    assert f"r1-launch resume=true run_dir={run_dir}" in message
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "reward/mean" in m] == [1]  # nothing trained after the failure
    state = json.loads((run_dir / "checkpoints" / "step_000001" / "driver_state.json").read_text())
    assert outstanding_uids(state["buffer"]) == [2, 3]  # step 2's prompts: owed, regenerated on resume
