"""The reward_model term (all-scenario RL): the tiny sequence-classification reward model built offline, its server
against a plain HF forward of each text alone, the term mixed with rule rewards, and end to end through the rollout
pool's Ray actors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch

from r1.data.prompts import load_prompts
from r1.data.template import apply_template
from r1.inputs import prepare_reward_model
from r1.rewards import build_reward
from r1.rewards.reward_model import RewardModelServer
from r1.types import Reference
from tests.conftest import TINY, compose, pools

GOOD = " <think> 1 + 2 = 3 , 3 + 3 = 6 , so 6 , check 6 - 3 = 3 , 3 - 2 = 1 , ok </think> <answer> 6 </answer>"
BAD = " the answer is 6"


def _cfg(cache_dir, run_dir="x", extra=()):
    return compose([*TINY, "+experiment=r1_all_scenario_rl", "logger=none", f"cache_dir={cache_dir}",
                    f"run_dir={run_dir}", "reward.model.tiny_train_steps=30", "reward.model.batch_size=3", *extra])


def _alone(path: str, text: str) -> float:
    """A plain HF forward of one text, no batch, no padding: the reference."""
    from transformers import AutoModelForSequenceClassification

    from r1.data.tokens import load_tokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return float(model(**load_tokenizer(path)(text, return_tensors="pt")).logits[0, 0])


def test_the_tiny_reward_model_scores_batches_as_each_text_alone_and_prefers_the_checked_chain(tiny_model, cache_dir):
    path = prepare_reward_model(_cfg(cache_dir))
    config = json.loads((Path(path) / "config.json").read_text())
    assert len(config["id2label"]) == 1  # (num_labels=1: one score)
    server = RewardModelServer(path, batch_size=3, template="r1_zero")
    prompts = ["Compute 1 + 2 + 3", "Compute 4 + 4 + 1 + 0", "Compute 2 + 2", "Compute 1 + 2 + 3"]
    responses = [GOOD, BAD, " <think> easy </think> <answer> 10 </answer>", " 6"]
    scores = server.score(prompts, responses)  # two batches of 3 and 1, padded
    for p, r, s in zip(prompts, responses, scores):
        assert s == pytest.approx(_alone(path, apply_template(p, "r1_zero") + r), abs=1e-4)
    assert scores[0] > scores[1]  # (trained to prefer the checked chain of thought)


def test_the_reward_model_term_scores_general_prompts_only(tiny_model, cache_dir):
    path = prepare_reward_model(_cfg(cache_dir))
    server = RewardModelServer(path, batch_size=4, template="r1_zero")
    reward = build_reward([("accuracy", 1.0), ("reward_model", 0.5)], reward_model=server.score)
    try:
        result = reward.score([GOOD, GOOD, BAD], [Reference(), Reference("6"), Reference()],
                              ["Explain 1 + 2 + 3", "Compute 1 + 2 + 3", "Explain 1 + 2 + 3"])
    finally:
        reward.verifier.close()
    general = server.score(["Explain 1 + 2 + 3"] * 2, [GOOD, BAD])
    assert result.components["reward_model"] == pytest.approx([general[0], 0.0, general[1]])
    assert result.components["accuracy"] == [0.0, 1.0, 0.0]
    assert result.total == pytest.approx([0.5 * general[0], 1.0, 0.5 * general[1]])
    with pytest.raises(ValueError, match="reward term reward_model needs a reward model"):
        build_reward([("reward_model", 1.0)])


def test_general_prompts_load_where_allowed(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"prompt": "Explain 1 + 2"}\n{"prompt": "Compute 1 + 2", "answer": "3"}\n')
    assert load_prompts(path).skipped == 1
    assert [p.reference.is_open for p in load_prompts(path, allow_open=True).problems] == [True, False]


@pytest.mark.slow
def test_all_scenario_rollouts_get_reward_model_scores_from_its_ray_actors(ray_local, tiny_model, cache_dir):
    cfg = _cfg(cache_dir, extra=["rollout.num_workers=2", "algo.group_size=3"])
    from r1.driver import sampling_params
    from r1.inputs import prepare_data

    train = prepare_data(cfg)[0].problems
    general = next(i for i, p in enumerate(train) if p.reference.is_open)
    answered = next(i for i, p in enumerate(train) if not p.reference.is_open)
    with pools(cfg, tiny_model) as (_, rollout, _sync):
        assert len(rollout.reward_models.actors) == 1
        problems = [(i, train[i].prompt, train[i].reference) for i in (general, answered)]
        for worker in (0, 1):  # both workers call the one replica
            groups = ray.get(rollout.submit(worker, problems, sampling_params(cfg, 0, seed=worker), [0, 1], 0)).groups
            path = prepare_reward_model(cfg)
            for s in groups[0].samples:
                expected = _alone(path, apply_template(train[general].prompt, "r1_zero") + s.response_text)
                assert s.reward_components["reward_model"] == pytest.approx(expected, abs=1e-4)
            assert all(s.reward_components["reward_model"] == 0.0 for s in groups[1].samples)
