"""The engines against independent references: the trainer's recompute, a fresh engine, the tokenizer itself."""

import asyncio
import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from r1.data.template import apply_template
from r1.data.tokens import TokenRules
from r1.engines.hf_rollout import HFRolloutEngine
from r1.engines.hf_train import HFTrainEngine
from r1.types import Group, Sample, SamplingParams, collate

PROMPTS = ["1 + 2", "3 + 4 + 5 + 6", "7", "8 + 9 + 1"]  # different lengths: left padding in generation


def _train_engine(model_path, **kw):
    args = {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.0, "warmup_steps": 0, "grad_clip": 1.0,
            "micro_batch_size": 3, "with_reference": False}
    return HFTrainEngine(model_path, **{**args, **kw})


@pytest.fixture(params=["qwen2", "llama"])
def model_path(request, tiny_model, tiny_llama):
    return {"qwen2": tiny_model, "llama": tiny_llama}[request.param]


def test_prompts_start_as_the_tokenizer_starts_them(tiny_model, tiny_llama):
    llama = TokenRules.load(tiny_llama)
    tok = llama.tokenizer
    assert tok.pad_token_id is None and llama.pad_id == tok.eos_token_id  # Llama 3: no pad token
    ids = llama.encode(apply_template("1 + 2"))
    assert ids == tok(apply_template("1 + 2"), add_special_tokens=True)["input_ids"]  # the tokenizer's own rule
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert llama.encode(tok.bos_token + "x") == tok("x", add_special_tokens=True)["input_ids"]  # never twice
    qwen = TokenRules.load(tiny_model)
    assert qwen.bos_id is None and qwen.pad_id == qwen.tokenizer.pad_token_id
    assert qwen.encode("1 + 2") == qwen.tokenizer("1 + 2", add_special_tokens=False)["input_ids"]


def test_rollout_logprobs_equal_the_trainers_recompute(model_path):
    """Left-padded sampling at T=0.7 vs the trainer's right-padded teacher-forced pass of the same sequences."""
    tokens = TokenRules.load(model_path)
    rollout = HFRolloutEngine(model_path, generate_batch_size=8)
    prompts = [tokens.encode(apply_template(p)) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(PROMPTS)
    params = SamplingParams(n=3, temperature=0.7, top_p=1.0, max_new_tokens=12, seed=11)
    completions = asyncio.run(rollout.generate(prompts, params))
    groups = [Group(i, "0", [Sample(prompts[i], c.token_ids, c.rollout_logprobs, "", 0.0, {}, None, c.finish_reason, 0)
                             for c in completions[i * 3:(i + 1) * 3]]) for i in range(len(prompts))]
    batch = collate(groups, torch.zeros(len(completions)), tokens.pad_id)
    assert batch.response_mask.sum() > 3 * len(completions)
    trainer = _train_engine(model_path)
    recomputed = trainer.compute_logprobs(batch, temperature=0.7)
    mask = batch.response_mask.bool()
    assert (recomputed[mask] - batch.rollout_logprobs[mask]).abs().max() < 1e-4
    # the canary's probe: the same tokens teacher-forced at temperature 1 by the rollout engine, as the trainer
    samples = [s for g in groups for s in g.samples]
    scored = asyncio.run(rollout.score([(s.prompt_ids, s.response_ids) for s in samples]))
    at_one = trainer.compute_logprobs(batch, temperature=1.0)
    assert (torch.cat([torch.tensor(x) for x in scored]) - at_one[mask]).abs().max() < 1e-4
    assert (at_one[mask] - recomputed[mask]).abs().max() > 1e-2  # (temperature 0.7 would be another number)


def test_checkpoint_generation_config_does_not_shape_sampling(tiny_model, tmp_path):
    """A model directory whose generation_config.json sets sampling knobs samples exactly like the bare model."""
    poisoned = tmp_path / "poisoned"
    shutil.copytree(tiny_model, poisoned)
    eos = AutoTokenizer.from_pretrained(tiny_model).eos_token_id
    (poisoned / "generation_config.json").write_text(json.dumps({
        "repetition_penalty": 1.8, "top_k": 3, "top_p": 0.5, "temperature": 0.2, "no_repeat_ngram_size": 2,
        "min_new_tokens": 6, "suppress_tokens": [eos], "eos_token_id": eos,
    }))
    prompts = [TokenRules.load(tiny_model).encode(apply_template(p)) for p in PROMPTS]
    params = SamplingParams(n=4, temperature=1.0, top_p=1.0, max_new_tokens=10, seed=5)
    got = asyncio.run(HFRolloutEngine(str(poisoned)).generate(prompts, params))
    want = asyncio.run(HFRolloutEngine(tiny_model).generate(prompts, params))  # a fresh engine, bare model
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.rollout_logprobs for c in got] == [c.rollout_logprobs for c in want]
