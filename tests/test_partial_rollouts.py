"""Partial rollouts at the engine: weights swapped between two decode steps, every token labelled with its version."""

import torch

from r1.engines.hf_rollout import HFRolloutEngine
from r1.types import SamplingParams


def _teacher_forced_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(tokens).unsqueeze(-1)).squeeze(-1)


def test_weights_change_mid_generation_and_tokens_record_their_version(tiny_model):
    engine = HFRolloutEngine(tiny_model)
    old_model = HFRolloutEngine(tiny_model).model
    new_weights = [(n, t + 0.05 * torch.randn_like(t)) for n, t in engine.named_weights()]
    calls = []

    def between_steps() -> int:  # before the first step, then after every step; swap after the 3rd token
        calls.append(len(calls))
        if len(calls) == 4:
            engine.load_weights(new_weights)
        return 0 if len(calls) < 4 else 1

    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=3)
    prompt = [5, 6, 7, 8]
    completions = engine.generate([prompt], params, between_steps=between_steps)
    for c in completions:
        assert c.token_versions[:3] == [0, 0, 0][: len(c.token_ids)]
        assert c.token_versions == sorted(c.token_versions) and set(c.token_versions) <= {0, 1}
        assert len(c.token_versions) == len(c.token_ids) == len(c.rollout_logprobs)
    longest = max(completions, key=lambda c: len(c.token_ids))
    assert len(longest.token_ids) > 4, "the tiny model stopped before the swap; pick another seed"
    # tokens before the swap were sampled from the old weights: their log-probs are the old model's
    reference = _teacher_forced_logprobs(old_model, prompt, longest.token_ids)
    assert torch.allclose(torch.tensor(longest.rollout_logprobs[:3]), reference[:3], atol=1e-4)
    # after it, the new weights are in force (the old model would give other log-probs) ...
    assert not torch.allclose(torch.tensor(longest.rollout_logprobs[3:]), reference[3:], atol=1e-3)
    # ... exactly as the new model computes them on top of the prefix the old one had cached (the KV cache is kept
    # across the swap): forwards 0-2 (prompt, tokens 0-1) ran on the old weights, forward 3 onwards on the new
    new_model = HFRolloutEngine(tiny_model)
    new_model.load_weights(new_weights)
    tokens = longest.token_ids
    with torch.no_grad():
        cache = old_model(input_ids=torch.tensor([prompt + tokens[:2]]), use_cache=True).past_key_values
        logits = new_model.model(input_ids=torch.tensor([tokens[2:-1]]), past_key_values=cache).logits[0]
    after_swap = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(tokens[3:]).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(torch.tensor(longest.rollout_logprobs[3:]), after_swap, atol=1e-4)
    # and the engine now serves the new weights
    for (name, t), (_, expected) in zip(engine.named_weights(), new_weights):
        assert torch.equal(t, expected), name


def test_without_a_hook_nothing_is_labelled(tiny_model):
    engine = HFRolloutEngine(tiny_model)
    [c] = engine.generate([[5, 6]], SamplingParams(n=1, max_new_tokens=4, seed=0))
    assert c.token_versions is None
