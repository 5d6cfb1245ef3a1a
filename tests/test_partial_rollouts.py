"""Partial rollouts at the engine: weights swapped between two decode steps, every token labelled with its version."""

import asyncio
import time

import torch

from r1.engines.hf_rollout import HFRolloutEngine
from r1.types import SamplingParams


def _teacher_forced_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(tokens).unsqueeze(-1)).squeeze(-1)


def test_weights_change_mid_generation_and_tokens_record_their_version(tiny_model):
    """update_weights while a request decodes: loaded between two decode steps, the request goes on."""
    engine = HFRolloutEngine(tiny_model, decode_step_s=0.05)  # slow enough to land the update mid-request
    old_model = HFRolloutEngine(tiny_model).model
    new_weights = [(n, t + 0.05 * torch.randn_like(t)) for n, t in engine.named_weights()]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seed=3)
    prompt = [5, 6, 7, 8]

    async def generate_and_update():
        started = time.time()
        task = asyncio.ensure_future(engine.generate([prompt], params))
        while engine.last_token_time <= started + 0.12:  # a few decode steps done
            await asyncio.sleep(0.005)
        await engine.update_weights(new_weights, version=1)
        return await task

    completions = asyncio.run(generate_and_update())
    for c in completions:
        assert c.token_versions == sorted(c.token_versions) and set(c.token_versions) <= {0, 1}
        assert len(c.token_versions) == len(c.token_ids) == len(c.rollout_logprobs)
    longest = max(completions, key=lambda c: len(c.token_ids))
    assert 0 in longest.token_versions and 1 in longest.token_versions, "the update missed the request"
    s = longest.token_versions.index(1)  # first token sampled by the new weights
    # tokens before the swap were sampled from the old weights: their log-probs are the old model's
    reference = _teacher_forced_logprobs(old_model, prompt, longest.token_ids)
    assert torch.allclose(torch.tensor(longest.rollout_logprobs[:s]), reference[:s], atol=1e-4)
    # after it, the new weights are in force (the old model would give other log-probs) ...
    assert not torch.allclose(torch.tensor(longest.rollout_logprobs[s:]), reference[s:], atol=1e-3)
    # ... exactly as the new model computes them on top of the prefix the old one had cached (the KV cache is kept
    # across the swap): forwards up to token s-2 ran on the old weights, forward s-1 onwards on the new
    new_model = HFRolloutEngine(tiny_model)
    new_model.load_weights(new_weights)
    tokens = longest.token_ids
    with torch.no_grad():
        cache = old_model(input_ids=torch.tensor([prompt + tokens[:s - 1]]), use_cache=True).past_key_values
        logits = new_model.model(input_ids=torch.tensor([tokens[s - 1:-1]]), past_key_values=cache).logits[0]
    after_swap = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(tokens[s:]).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(torch.tensor(longest.rollout_logprobs[s:]), after_swap, atol=1e-4)
    # and the engine now serves the new weights, as the version it reports
    assert engine.version == 1
    for (name, t), (_, expected) in zip(engine.named_weights(), new_weights):
        assert torch.equal(t, expected), name


def test_an_idle_engine_loads_at_once_and_labels_every_token(tiny_model):
    engine = HFRolloutEngine(tiny_model)
    asyncio.run(engine.update_weights(list(engine.named_weights()), version=4))
    [c] = asyncio.run(engine.generate([[5, 6]], SamplingParams(n=1, max_new_tokens=4, seed=0)))
    assert c.token_versions == [4] * len(c.token_ids)
