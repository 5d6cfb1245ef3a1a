"""Per-token log-probs (and entropies) from hidden states, vocab-parallel and in chunks of tokens.

The [tokens x vocab] logits are the largest tensor of an RL step at long context (65K tokens x 152K vocab in fp32
is 40 GB). Here each tensor-parallel rank projects only its slice of the vocabulary, the softmax normaliser is
all-reduced over TP, and tokens go through in chunks whose logits are recomputed in the backward pass
(activation checkpointing), so memory grows with the chunk, not with sequence length x vocab.

Megatron pads the vocabulary to a multiple of the TP size (``r1.engines.megatron.bridge``); the padding columns
(zero weights, logit 0) are masked to -inf here, or they would take probability mass from the real vocabulary.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _tp():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_rank()


def _chunk(hidden, weight, targets, vocab_size: int, temperature: float, with_entropy: bool):
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region as copy_to_tp
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region as sum_over_tp

    group, rank = _tp()
    local_vocab = weight.shape[0]
    first = rank * local_vocab
    # (copy: identity forward, grads summed over TP); the projection in the weight's dtype (bf16 training: the model
    # hands back fp32 hidden states), then fp32 for the softmax
    logits = F.linear(copy_to_tp(hidden).to(weight.dtype), weight).float()
    if temperature != 1.0:
        logits = logits / temperature
    real = torch.arange(first, first + local_vocab, device=logits.device) < vocab_size
    if not bool(real.all()):
        logits = logits.masked_fill(~real, float("-inf"))
    with torch.no_grad():
        top = logits.max(dim=-1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - top.unsqueeze(-1)
    exp = shifted.exp()
    normaliser = sum_over_tp(exp.sum(-1))
    local = targets - first
    mine = (local >= 0) & (local < local_vocab)
    picked = shifted.gather(-1, local.clamp(0, local_vocab - 1).unsqueeze(-1)).squeeze(-1)
    picked = sum_over_tp(torch.where(mine, picked, torch.zeros_like(picked)))
    logp = picked - normaliser.log()
    if not with_entropy:
        return logp, None
    with torch.no_grad():  # H = log Z - sum p * shifted  (padding columns: p = 0, and 0 * -inf is avoided)
        weighted = torch.where(real, exp * shifted, torch.zeros_like(shifted)).sum(-1)
        dist.all_reduce(weighted, group=group)
        entropy = normaliser.log() - weighted / normaliser
    return logp, entropy


def vocab_parallel_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, vocab_size: int,
                            temperature: float = 1.0, chunk_tokens: int = 4096, with_entropy: bool = False):
    """log p(targets) for hidden states ``[N, H]`` under the output layer ``weight`` (this TP rank's vocabulary
    slice ``[V/tp, H]``) at ``temperature``: ``[N]``, differentiable; with ``with_entropy`` also the entropy of
    each distribution (no grad). Every TP rank passes the same ``hidden`` and ``targets`` and gets the same result.
    ``chunk_tokens`` bounds the logits alive at once (``<= 0``: one chunk, no recomputation)."""
    n = hidden.shape[0]
    if n == 0:  # (a context-parallel rank can hold no token that predicts a response token)
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    step = n if chunk_tokens <= 0 else max(1, chunk_tokens)
    logps, entropies = [], []
    for start in range(0, n, step):
        h, t = hidden[start:start + step], targets[start:start + step]
        if step < n and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            logp, entropy = checkpoint(_chunk, h, weight, t, vocab_size, temperature, with_entropy,
                                       use_reentrant=False)
        else:
            logp, entropy = _chunk(h, weight, t, vocab_size, temperature, with_entropy)
        logps.append(logp)
        entropies.append(entropy)
    return torch.cat(logps), (torch.cat(entropies) if with_entropy else None)
