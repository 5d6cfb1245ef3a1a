"""The GRPO step on Megatron (real gloo ranks) against the same step on the HF engine in one process: the same loss
(r1.algo's GRPOLoss, with KL to the reference) and the same updated weights, at TP=1, TP=2, DP=2, PP=2 and CP=2, with
one packed micro-batch and with several (Megatron's schedules, the pipeline's included)."""

from __future__ import annotations

import pytest
import torch

from r1.algo import GRPOLoss
from r1.engines.hf_train import load_safetensors_dir
from r1.types import TrainBatch
from tests.gloo_ranks import run_ranks
from tests.test_megatron_bridge import VOCAB, _save_hf

pytestmark = pytest.mark.slow

# a weight decay this large moves a decayed weight by 10% in one step: the engines must agree on which they decay
# (matrices and embeddings, not biases or norm scales)
OPTIM = {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 10.0, "warmup_steps": 0, "grad_clip": 1.0}


def _batch() -> TrainBatch:
    """8 right-padded rows: prompts of 3-5 tokens, responses of 2-6 tokens."""
    g = torch.Generator().manual_seed(3)
    rows, width = 8, 11
    ids = torch.zeros(rows, width, dtype=torch.long)
    attn, resp = torch.zeros(rows, width, dtype=torch.long), torch.zeros(rows, width)
    for r in range(rows):
        p, n = 3 + r % 3, 2 + (r * 3) % 5
        ids[r, : p + n] = torch.randint(1, VOCAB, (p + n,), generator=g)
        attn[r, : p + n] = 1
        resp[r, p : p + n] = 1
    return TrainBatch(ids, attn, resp, torch.randn(rows, generator=g),
                      rollout_logprobs=-torch.rand(rows, width, generator=g) * resp)


def _loss() -> GRPOLoss:
    return GRPOLoss(clip_low=0.2, clip_high=0.28, agg="token_mean", kl_coef=0.1, kl_kind="k3", kl_in_loss=True,
                    temperature=0.9, norm_constant=8.0)


def _sequence_loss() -> GRPOLoss:
    """Everything that reads a whole sequence: GSPO's ratio, sequence-level IS, the geometric-mean mask."""
    return GRPOLoss(clip_low=0.2, clip_high=0.28, agg="seq_mean_token_mean", kl_coef=0.1, kl_kind="k3",
                    kl_in_loss=True, temperature=0.9, policy_loss="gspo", is_level="sequence", is_cap=1.1,
                    mask_level="sequence", mask_low=0.97, mask_high=1.03)


def _off_policy(batch: TrainBatch, logp: torch.Tensor) -> TrainBatch:
    """pi_old = the policy's log-probs shifted per row (sequence ratios 0.94-1.06), mu a little further off: the
    sequence weights differ by row and the mask drops the rows whose geometric mean leaves [0.97, 1.03]."""
    rows = torch.arange(len(batch), dtype=torch.float32)[:, None]
    batch.old_logprobs = (logp + 0.06 * torch.cos(rows)) * batch.response_mask
    batch.rollout_logprobs = (batch.old_logprobs - 0.04 * torch.sin(2 * rows)) * batch.response_mask
    return batch


def _megatron_step(rank: int, world: int, hf_dir: str, tp: int, pp: int, cp: int, micro_batch_tokens: int,
                   recompute: str = "none", sequence_parallel: bool = True, sequence_loss: bool = False):
    import traceback

    from megatron.core import parallel_state
    from megatron.core.distributed import param_and_grad_buffer

    from r1.engines.megatron.attention import PackedCoreAttention
    from r1.engines.megatron.engine import MegatronTrainEngine
    from r1.engines.megatron.layout import ParallelLayout
    from r1.engines.megatron.norm import SequenceParallelRMSNorm

    engine = MegatronTrainEngine(hf_dir, layout=ParallelLayout(tp=tp, pp=pp, cp=cp),
                                 micro_batch_tokens=micro_batch_tokens, with_reference=True, logprob_chunk_tokens=7,
                                 recompute=recompute, sequence_parallel=sequence_parallel, **OPTIM)
    batch = _batch()
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    shard = batch.select(torch.arange(len(batch))[dp_rank::dp]) if dp > 1 else batch
    before = engine.compute_logprobs(shard, temperature=0.9)

    attention, norm, reduce_scatter = PackedCoreAttention.forward, SequenceParallelRMSNorm.forward, None
    calls, normed, reductions = [], [], []

    def counted(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return attention(self, *args, **kwargs)

    def norm_counted(self, x):  # (the tokens each norm call sees: all of a CP rank's stream, or 1/TP of it)
        normed.append(x.shape[0])
        return norm(self, x)

    def reduce_scatter_seen(*args, **kwargs):  # called from a gradient hook (backward) or after the schedule
        reductions.append(any(f.name == "register_grad_ready" for f in traceback.extract_stack()))
        return reduce_scatter(*args, **kwargs)

    PackedCoreAttention.forward, SequenceParallelRMSNorm.forward = counted, norm_counted
    if sequence_loss:
        stats = engine.train_step(_off_policy(shard, before), _sequence_loss())
        PackedCoreAttention.forward, SequenceParallelRMSNorm.forward = attention, norm
        return before, stats, {name: tensor.clone() for name, tensor in engine.named_weights()}
    stats = engine.train_step(shard, _loss())
    PackedCoreAttention.forward, SequenceParallelRMSNorm.forward = attention, norm
    weights = {name: tensor.clone() for name, tensor in engine.named_weights()}  # (the next step moves them)
    if dp > 1:  # (Megatron counts each bucket's gradients in the first step; it overlaps from the second on)
        reduce_scatter, param_and_grad_buffer.dist_reduce_scatter_func = (
            param_and_grad_buffer.dist_reduce_scatter_func, reduce_scatter_seen)
        engine.train_step(shard, _loss())
        param_and_grad_buffer.dist_reduce_scatter_func = reduce_scatter
    stream = sum(int(mb.cu_seqlens[-1]) for mb in engine._micro_batches(shard)) // cp
    return before, stats | {"attention_calls": len(calls), "normed_tokens": sum(normed), "stream_tokens": stream,
                            "reductions_in_backward": reductions}, weights


def _hf_step(hf_dir: str, sequence_loss: bool = False):
    from r1.engines.hf_train import HFTrainEngine

    engine = HFTrainEngine(hf_dir, micro_batch_size=8, with_reference=True, **OPTIM)
    before = engine.compute_logprobs(_batch(), temperature=0.9)
    if sequence_loss:
        return before, engine.train_step(_off_policy(_batch(), before), _sequence_loss()), dict(engine.named_weights())
    stats = engine.train_step(_batch(), _loss())
    return before, stats, dict(engine.named_weights())


# the batch holds 8 sequences of 5-9 tokens (61 in all): 1000 tokens is one packed micro-batch, 25 is three
# (TP=2 with several micro-batches and sequence parallelism is the SFT test's layout below)
@pytest.mark.parametrize("tp,pp,cp,dp,micro_batch_tokens,tied,sp", [
    (1, 1, 1, 1, 1000, False, True), (1, 1, 1, 2, 1000, False, True), (1, 2, 1, 1, 25, False, True),
    (1, 2, 1, 1, 25, True, True), (1, 1, 2, 1, 25, False, True), (2, 1, 2, 1, 1000, True, True),
    (2, 1, 1, 1, 25, False, False),
], ids=["tp1", "dp2", "pp2-microbatches", "pp2-tied-embeddings", "cp2-microbatches", "tp2-cp2-tied-sp",
        "tp2-microbatches-no-sp"])
def test_a_grpo_step_on_megatron_equals_the_hf_engine(tmp_path, tp, pp, cp, dp, micro_batch_tokens, tied, sp):
    """Megatron's packed micro-batches against the HF engine's padded batch: the same loss, gradient norm and
    updated weights. (Tied embeddings at PP=2: the first stage's embedding and the last stage's output layer are one
    HF tensor, so their gradients must be summed across the stages. CP=2: every sequence is split over two ranks.
    TP=2 with sequence parallelism: the norms see half of each stream and their gradients are summed over TP. DP=2:
    gradients are reduce-scattered from within the backward pass, overlapping it.)"""
    hf_dir = _save_hf(tmp_path / "hf", "qwen2", tied=tied)
    initial = load_safetensors_dir(tmp_path / "hf")
    hf_before, hf_stats, hf_weights = _hf_step(hf_dir)
    results = run_ranks(_megatron_step, tp * pp * cp * dp, hf_dir, tp, pp, cp, micro_batch_tokens, "none", sp,
                        tmp_path=tmp_path)
    before, stats, weights = results[0]
    if (tp, pp, cp, dp) == (1, 1, 1, 1):  # without recomputation: the reference's forward and the policy's, once
        assert stats["attention_calls"] == 2 * 2 * (1 if micro_batch_tokens == 1000 else 3)
    if pp == 1:  # each norm (2 layers x 2 + the final one) of the reference's forward and the policy's sees the
        # (CP rank's) stream, or 1/TP of it under sequence parallelism
        assert stats["normed_tokens"] == 2 * 5 * stats["stream_tokens"] // (tp if sp else 1)
    if dp > 1:  # overlap_grad_reduce: the reduce-scatter starts in the gradient hook of the bucket's last gradient
        # (in the next step; in the first Megatron counts the gradients each bucket gets)
        assert stats["reductions_in_backward"] and all(stats["reductions_in_backward"])
    if dp == 1:
        mask = _batch().response_mask.bool()
        torch.testing.assert_close(before[mask], hf_before[mask], atol=1e-5, rtol=1e-5)
    for key in ("loss", "kl", "grad_norm"):
        assert stats[key] == pytest.approx(hf_stats[key], rel=1e-4, abs=1e-6), key
    assert set(weights) == set(hf_weights)
    moved = 0.0
    for name, tensor in hf_weights.items():
        # Adam's first step is lr * g / (|g| + eps): for a gradient entry near eps, summation-order noise moves
        # the update by up to a few 1e-5 (packed vs padded sums differ in order); 1e-4 is 1% of one step (lr 1e-2)
        torch.testing.assert_close(weights[name], tensor, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
        moved = max(moved, float((tensor - initial[name]).abs().max()))
    assert moved > 1e-3  # the step changed the weights (lr 1e-2): equality is not of two untouched copies



def test_sequence_level_losses_and_corrections_on_megatron_with_split_sequences_equal_the_hf_engine(tmp_path):
    """GSPO's sequence ratio, sequence-level IS and the geometric-mean mask read whole sequences; at CP=2 every
    sequence is split over two ranks (and over micro-batches): the engine's gathered log-probs must give the loss
    whole rows. Same loss, gradient norm, weights and correction stats as the HF engine's padded batch."""
    hf_dir = _save_hf(tmp_path / "hf", "qwen2", tied=False)
    _, hf_stats, hf_weights = _hf_step(hf_dir, sequence_loss=True)
    assert 0 < hf_stats["mask_seq_fraction"] < 1 and 0 < hf_stats["is_clipped_fraction"] < 1  # (the premise)
    _, stats, weights = run_ranks(_megatron_step, 2, hf_dir, 1, 1, 2, 25, "none", True, True, tmp_path=tmp_path)[0]
    # (token-level stats are averaged over micro-batches by the loss's units, sequences here: not compared)
    for key in ("loss", "kl", "grad_norm", "mask_seq_fraction"):
        assert stats[key] == pytest.approx(hf_stats[key], rel=1e-4, abs=1e-6), key
    for name, tensor in hf_weights.items():
        torch.testing.assert_close(weights[name], tensor, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_activation_recomputation_gives_the_same_step(tmp_path, recompute):
    """Recomputing activations in the backward pass (the core attention, or whole layers) changes memory, not the
    step: the same loss and weights as the HF engine, with several packed micro-batches."""
    hf_dir = _save_hf(tmp_path / "hf", "qwen2", tied=False)
    _, hf_stats, hf_weights = _hf_step(hf_dir)
    _, stats, weights = run_ranks(_megatron_step, 1, hf_dir, 1, 1, 1, 25, recompute, tmp_path=tmp_path)[0]
    # 2 layers x 3 micro-batches: the reference's forward, the policy's, and the policy's again in the backward
    assert stats["attention_calls"] == 6 + 6 + 6
    for key in ("loss", "kl", "grad_norm"):
        assert stats[key] == pytest.approx(hf_stats[key], rel=1e-4, abs=1e-6), key
    for name, tensor in hf_weights.items():
        torch.testing.assert_close(weights[name], tensor, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def _megatron_bf16_step(rank: int, world: int, hf_dir: str, grad_reduce_in_fp32: bool):
    from r1.engines.megatron.engine import MegatronTrainEngine
    from r1.engines.megatron.layout import ParallelLayout

    engine = MegatronTrainEngine(hf_dir, layout=ParallelLayout(), micro_batch_tokens=25, with_reference=True,
                                 dtype="bfloat16", grad_reduce_in_fp32=grad_reduce_in_fp32, **OPTIM)
    grad_dtypes = {p.main_grad.dtype for chunk in engine.chunks for p in chunk.parameters()}
    return engine.train_step(_batch(), _loss()) | {"grad_dtypes": grad_dtypes}, dict(engine.named_weights())


@pytest.mark.parametrize("grad_reduce_in_fp32", [False, True], ids=["bf16-grads", "fp32-grads"])
def test_a_bf16_step_matches_the_hf_engines_bf16_step(tmp_path, grad_reduce_in_fp32):
    """bf16 compute with fp32 master weights (Megatron's Float16Module + distributed optimizer) against the HF
    engine's bf16 autocast over fp32 masters: the same loss, a gradient norm within bf16 noise, and bf16 weights for
    the rollout pool within a few bf16 steps of each other (lr 1e-2: each weight moves ~0.01). Gradients accumulate
    over the three micro-batches and are reduced in bf16 (the default), or in fp32."""
    from r1.engines.hf_train import HFTrainEngine

    hf_dir = _save_hf(tmp_path / "hf", "qwen2", tied=False)
    hf = HFTrainEngine(hf_dir, micro_batch_size=8, with_reference=True, dtype="bfloat16", **OPTIM)
    hf_stats, hf_weights = hf.train_step(_batch(), _loss()), dict(hf.named_weights())
    stats, weights = run_ranks(_megatron_bf16_step, 1, hf_dir, grad_reduce_in_fp32, tmp_path=tmp_path)[0]
    assert stats["grad_dtypes"] == {torch.float32 if grad_reduce_in_fp32 else torch.bfloat16}
    assert stats["loss"] == pytest.approx(hf_stats["loss"], rel=1e-3)
    assert stats["grad_norm"] == pytest.approx(hf_stats["grad_norm"], rel=2e-2)
    for name, tensor in hf_weights.items():
        assert weights[name].dtype == tensor.dtype == torch.bfloat16
        torch.testing.assert_close(weights[name].float(), tensor.float(), atol=3e-2, rtol=1e-2,
                                   msg=lambda m, name=name: f"{name}: {m}")


def _sft_megatron_step(rank: int, world: int, hf_dir: str, tp: int):
    from r1.algo import SFTLoss
    from r1.engines.megatron.engine import MegatronTrainEngine
    from r1.engines.megatron.layout import ParallelLayout

    engine = MegatronTrainEngine(hf_dir, layout=ParallelLayout(tp=tp, pp=1, cp=1), micro_batch_tokens=25,
                                 with_reference=False, logprob_chunk_tokens=7, recompute="none", **OPTIM)
    stats = engine.train_step(_batch(), SFTLoss())
    return stats, dict(engine.named_weights())


def test_an_sft_step_on_megatron_equals_the_hf_engine_with_packed_sequences(tmp_path):
    """The SFT stages run on the same engines: an SFT step on Megatron (TP=2 with sequence parallelism, packed
    micro-batches) equals the HF engine's with its sequence packing (trainer.micro_batch_tokens): loss, gradient
    norm, updated weights."""
    from r1.algo import SFTLoss
    from r1.engines.hf_train import HFTrainEngine

    hf_dir = _save_hf(tmp_path / "hf", "qwen2", tied=False)
    hf = HFTrainEngine(hf_dir, micro_batch_size=8, micro_batch_tokens=25, with_reference=False, **OPTIM)
    hf_stats = hf.train_step(_batch(), SFTLoss())
    hf_weights = dict(hf.named_weights())
    stats, weights = run_ranks(_sft_megatron_step, 2, hf_dir, 2, tmp_path=tmp_path)[0]
    for key in ("loss", "nll", "grad_norm"):
        assert stats[key] == pytest.approx(hf_stats[key], rel=1e-4, abs=1e-6), key
    for name, tensor in hf_weights.items():
        # (Adam's first step is lr * sign(g) for |g| >> eps: a gradient entry within float noise of zero may move
        # the other way; all but a handful of entries agree to 1e-4)
        off = ((weights[name] - tensor).abs() > 1e-4).float().mean()
        assert off < 2e-3, (name, float(off))
