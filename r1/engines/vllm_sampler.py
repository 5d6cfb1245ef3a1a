"""vLLM reports each sampled token's log-prob under the full temperature-scaled distribution, whatever top-p says.

The trainer's ratio pi/mu and its KL terms compare the log-prob of a sampled token under ``log_softmax(logits / T)``
over the whole vocabulary (``r1.engines.hf_train.token_logprobs``, the Megatron engine's vocab-parallel one). vLLM
0.32 has four ``logprobs_mode``s and none of them is that when top-k/top-p is on: the raw modes are before the
temperature, the processed ones after the top-k/top-p mask (renormalised over the kept tokens;
``vllm/v1/sample/ops/topk_topp_sampler.py``, ``forward_native``/``forward_cpu``). With ``rollout.top_p < 1`` every
recorded log-prob would be too high by the log of the kept mass, and the importance weights biased.

So r1 runs vLLM with ``logprobs_mode="processed_logprobs"`` (temperature, penalties and min-p applied) and makes the
sampler take those log-probs *before* it masks the logits for top-k/top-p: sampling is unchanged (it still samples from
the truncated distribution), only the reported number is the full distribution's. Without top-k/top-p vLLM passes no
mask and the value is unchanged.

This patches vLLM's V1 model runner's sampler, the one r1 runs (on CPU it is the only one; on GPU
``VLLM_USE_V2_MODEL_RUNNER=0`` is set by the engine, see ``r1.engines.vllm_rollout``). It is a ``vllm.general_plugins``
entry point (pyproject), so it runs in every process vLLM starts, before any sampler exists.
"""

from __future__ import annotations

import functools

import torch


def _before_the_mask(forward):
    @functools.wraps(forward)
    def wrapped(self, logits, generators, k, p):
        full = None
        if self.logprobs_mode == "processed_logprobs" and (k is not None or p is not None):
            full = logits.log_softmax(dim=-1, dtype=torch.float32)  # before the mask (applied in place)
        sampled, processed = forward(self, logits, generators, k, p)
        return sampled, (full if full is not None else processed)

    wrapped.r1_full_distribution = True
    return wrapped


def register() -> None:
    """vLLM general plugin: patch ``TopKTopPSampler`` (idempotent)."""
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

    for name in ("forward_native", "forward_cpu"):
        method = getattr(TopKTopPSampler, name)
        if not getattr(method, "r1_full_distribution", False):
            setattr(TopKTopPSampler, name, _before_the_mask(method))
