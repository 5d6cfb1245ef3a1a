"""Vocab-parallel, chunked log-probs on real gloo TP ranks against a plain full-vocabulary log_softmax in one
process: same log-probs, entropies and gradients, with and without chunking, padding columns masked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.gloo_ranks import run_ranks

pytestmark = pytest.mark.slow

V, H, N, T = 131, 16, 23, 0.7  # odd vocabulary: TP=2 pads it to 132


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, H, generator=g), torch.randn(V, H, generator=g),
            torch.randint(0, V, (N,), generator=g), torch.randn(N, generator=g))


def _on_rank(rank: int, world: int, chunk_tokens: int):
    from megatron.core import parallel_state

    from r1.engines.megatron import cpu_compat
    from r1.engines.megatron.layout import ParallelLayout, initialize
    from r1.engines.megatron.logprobs import vocab_parallel_logprobs

    cpu_compat.apply()
    initialize(ParallelLayout(tp=world), world, seed=0)
    hidden, weight, targets, coef = _inputs()
    padded = F.pad(weight, (0, 0, 0, -V % world))  # as Megatron pads the vocabulary (zero rows)
    local = padded.chunk(world)[rank].clone().requires_grad_(True)
    hidden = hidden.requires_grad_(True)
    logp, entropy = vocab_parallel_logprobs(hidden, local, targets, vocab_size=V, temperature=T,
                                            chunk_tokens=chunk_tokens, with_entropy=True)
    (logp * coef).sum().backward()
    grads = [torch.empty_like(local.grad) for _ in range(world)]
    torch.distributed.all_gather(grads, local.grad, group=parallel_state.get_tensor_model_parallel_group())
    return logp.detach(), entropy, hidden.grad, torch.cat(grads)[:V]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("chunk_tokens", [0, 5], ids=["whole", "chunks-of-5"])
def test_vocab_parallel_chunked_logprobs_equal_a_full_log_softmax(tmp_path, tp, chunk_tokens):
    hidden, weight, targets, coef = _inputs()
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    logits = hidden @ weight.T / T
    full = torch.log_softmax(logits, dim=-1)
    expected = full.gather(-1, targets[:, None]).squeeze(-1)
    expected_entropy = -(full.exp() * full).sum(-1).detach()
    (expected * coef).sum().backward()

    for logp, entropy, hidden_grad, weight_grad in run_ranks(_on_rank, tp, chunk_tokens, tmp_path=tmp_path):
        torch.testing.assert_close(logp, expected.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entropy, expected_entropy, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hidden_grad, hidden.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(weight_grad, weight.grad, atol=1e-5, rtol=1e-5)
