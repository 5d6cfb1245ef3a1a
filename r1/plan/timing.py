"""Seconds per GRPO step: generation (decode-bound), training (FLOPs at a stated MFU), weight sync (bytes over the link).

Decode is memory-bound: each step of an engine reads its weights once and the KV cache of every sequence in flight,
from HBM at ``decode_bandwidth_share`` of the data sheet's bandwidth; it is compute-bound only at very large batches
(2 FLOPs a parameter a token, at half the peak). A step's generation ends with its longest response, decoded at the
pace of a nearly empty batch. Training is 6 FLOPs a parameter a token (forward 2, backward 4) plus attention's, plus
one more forward with full recomputation, plus the forward passes for the old policy's and the reference's
log-probs, at ``train_mfu`` of the pool's peak.
"""

from __future__ import annotations

from dataclasses import dataclass

from r1.plan.gpus import GPUKind
from r1.plan.shape import ModelShape


@dataclass(frozen=True)
class Assumptions:
    """What the config does not say (``planner.*``, r1/config/schema.py, where the defaults live)."""

    prompt_tokens: int
    mean_response_share: float
    train_mfu: float
    decode_bandwidth_share: float
    network_gbps: float
    dtype_bytes: int = 2  # the served weights and KV cache (bf16)


def forward_flops_per_token(shape: ModelShape, context: float) -> float:
    """2 FLOPs per weight (the embedding lookup is free, the output projection is not) and causal attention over
    ``context`` tokens on average: QK^T and AV, 2 x 2 x heads x head_dim x context per layer."""
    weights = shape.params() - shape.embedding_params() * (0 if shape.tied else 1)
    return 2 * weights + 4 * shape.layers * shape.heads * shape.head_dim * context


def decode_step_s(shape: ModelShape, gpu: GPUKind, *, tp: int, sequences: float, context: float,
                  bandwidth_share: float, dtype_bytes: int = 2) -> float:
    """One decode step of an engine (TP ranks) with ``sequences`` in flight at ``context`` tokens each."""
    kv_rank = shape.kv_bytes_per_token(dtype_bytes) / min(tp, shape.kv_heads)
    read = shape.params() * dtype_bytes / tp + sequences * context * kv_rank
    memory_s = read / (gpu.hbm_bytes_s * bandwidth_share)
    compute_s = sequences * forward_flops_per_token(shape, context) / tp / (gpu.bf16_flops * 0.5)
    # two all-reduces of the batch's hidden states per layer over NVLink, ~10 us each at least
    allreduce_s = 0.0 if tp == 1 else 2 * shape.layers * (1e-5 + sequences * shape.hidden * 2 / gpu.nvlink_bytes_s)
    return max(memory_s, compute_s) + allreduce_s


def generation_s(shape: ModelShape, gpu: GPUKind, a: Assumptions, *, sequences: int, engines: int, tp: int,
                 max_tokens: int, concurrency: float) -> dict[str, float]:
    """The rollout pool's time for one step's ``sequences`` over ``engines`` engines keeping ``concurrency``
    sequences each in flight (bounded by KV cache and max_num_seqs)."""
    per_engine = -(-sequences // engines)
    in_flight = max(1.0, min(concurrency, per_engine))
    mean = a.mean_response_share * max_tokens
    steps = per_engine * mean / in_flight
    bulk = steps * decode_step_s(shape, gpu, tp=tp, sequences=in_flight, context=a.prompt_tokens + mean / 2,
                                 bandwidth_share=a.decode_bandwidth_share, dtype_bytes=a.dtype_bytes)
    tail = max_tokens * decode_step_s(shape, gpu, tp=tp, sequences=1, context=a.prompt_tokens + max_tokens / 2,
                                      bandwidth_share=a.decode_bandwidth_share, dtype_bytes=a.dtype_bytes)
    prefill = per_engine * a.prompt_tokens * forward_flops_per_token(shape, a.prompt_tokens / 2) / tp / (
        gpu.bf16_flops * 0.5)
    return {"generation_s": max(bulk, tail) + prefill, "decode_tokens_s": per_engine * mean * engines / max(
        bulk, tail), "in_flight": in_flight, "tail_bound": float(tail > bulk)}


def training_s(shape: ModelShape, gpu: GPUKind, a: Assumptions, *, sequences: int, max_tokens: int, gpus: int,
               recompute_full: bool, reference: bool) -> float:
    mean = a.mean_response_share * max_tokens
    tokens = sequences * (a.prompt_tokens + mean)
    forward = forward_flops_per_token(shape, (a.prompt_tokens + mean) / 2)
    passes = 3 + (1 if recompute_full else 0) + 1 + (1 if reference else 0)  # fwd+bwd, recompute, pi_old, reference
    return tokens * forward * passes / (gpus * gpu.bf16_flops * a.train_mfu)


def sync_s(shape: ModelShape, gpu: GPUKind, a: Assumptions) -> float:
    """One push: the bf16 weights gathered to the trainer's rank 0 over NVLink, then broadcast to every engine over
    the inter-node link (a pipelined broadcast costs about one transfer, whatever the number of receivers)."""
    payload = shape.params() * a.dtype_bytes
    return payload / gpu.nvlink_bytes_s + payload / (a.network_gbps / 8 * 1e9)
