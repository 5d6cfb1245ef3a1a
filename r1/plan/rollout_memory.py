"""Bytes per GPU of the rollout pool: vLLM (weights, its profiled activation peak, the KV cache it sizes from what is
left of ``gpu_memory_utilization``) or the HF engine (weights and a growing KV cache per sequence in flight).

vLLM 0.32's GPU worker (``vllm/v1/worker/gpu_worker.py``, ``determine_available_memory``) gives the KV cache
``total x gpu_memory_utilization`` minus the weights, the activation peak of a profiling forward pass over
``max_num_batched_tokens`` tokens, and non-torch memory (NCCL, CUDA graphs); r1 turns chunked prefill off, so that
pass is ``max(max_model_len, 2048)`` tokens long (``vllm/engine/arg_utils.py``; AsyncLLM's defaults are
``vllm/config/scheduler.py``'s). The cache is cut into blocks of ``block_size`` tokens of every layer's K and V
(``vllm/v1/kv_cache_interface.py``, ``page_size_bytes``: 2 x block x KV heads per rank x head_dim x dtype);
``num_blocks = available // (layers x page)`` (``vllm/v1/core/kv_cache_utils.py``), one of them the null block.
vLLM refuses to start unless ``num_blocks - 1 >= ceil(max_model_len / block)``, and logs "maximum concurrency"
``num_blocks / ceil(max_model_len / block)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from r1.plan.gpus import GIB
from r1.plan.shape import ModelShape

BLOCK_SIZE = 16  # vLLM's KV block on CUDA (flash attention, bf16); 128 on CPU (vllm/platforms/cpu.py)
NON_TORCH_BYTES = 1.5 * GIB  # NCCL's buffers and CUDA graphs' pools outside torch's allocator (vLLM profiles them)
DEFAULT_BATCHED_TOKENS = 2048  # AsyncLLM's max_num_batched_tokens (vllm/config/scheduler.py), raised to max_model_len


@dataclass(frozen=True)
class EngineLayout:
    tp: int = 1
    max_model_len: int = 32768
    max_num_seqs: int = 256
    gpu_memory_utilization: float = 0.85
    kv_cache_bytes: int = 0  # rollout.vllm.kv_cache_mb, when set: vLLM takes it as the cache's size


def kv_bytes_per_token_rank(shape: ModelShape, tp: int, dtype_bytes: int = 2) -> float:
    """KV heads are split over TP; with more TP ranks than KV heads each rank keeps a replica of one."""
    return shape.kv_bytes_per_token(dtype_bytes) / min(tp, shape.kv_heads)


def block_bytes(shape: ModelShape, tp: int, dtype_bytes: int = 2, block_size: int = BLOCK_SIZE) -> float:
    """One KV block of every layer: 2 (K, V) x block_size x KV heads x head_dim x dtype, times the layers."""
    return block_size * kv_bytes_per_token_rank(shape, tp, dtype_bytes)


def batched_tokens(eng: EngineLayout) -> int:
    """The profiling pass's tokens with chunked prefill off (vllm/engine/arg_utils.py)."""
    return min(eng.max_num_seqs * eng.max_model_len, max(eng.max_model_len, DEFAULT_BATCHED_TOKENS))


def profile_activation_bytes(shape: ModelShape, tp: int, tokens: int, max_num_seqs: int) -> float:
    """The profiling pass's peak: one layer's working set for every batched token (residual, normed input, QKV,
    the MLP's gate/up output and its activation; bf16) and the sampler's fp32 logits (and a copy) for its rows."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_token = (2 * shape.hidden + (q + 2 * kv) / tp + 3 * shape.intermediate / tp) * 2
    return tokens * per_token + 2 * min(tokens, max_num_seqs) * shape.vocab * 4


def blocks_per_sequence(max_model_len: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-max_model_len // block_size)


def vllm_memory(shape: ModelShape, gpu_bytes: float, eng: EngineLayout) -> dict[str, float]:
    """Bytes per GPU by term, the KV cache's size, and the sequences it keeps in flight at max_model_len."""
    weights = shape.params() * 2 / eng.tp
    activations = profile_activation_bytes(shape, eng.tp, batched_tokens(eng), eng.max_num_seqs)
    budget = gpu_bytes * eng.gpu_memory_utilization
    if eng.kv_cache_bytes:
        kv = float(eng.kv_cache_bytes)
    else:
        kv = max(0.0, budget - weights - activations - NON_TORCH_BYTES)
    blocks = int(kv // block_bytes(shape, eng.tp))
    return {"weights": weights, "activations": activations, "non_torch": NON_TORCH_BYTES, "kv_cache": kv,
            "kv_blocks": blocks, "kv_tokens": max(0, blocks - 1) * BLOCK_SIZE,  # (less the null block)
            "in_flight_at_max_len": blocks / blocks_per_sequence(eng.max_model_len),
            "budget": budget}


def hf_rollout_memory(shape: ModelShape, *, batch: int, max_len: int, dtype_bytes: int) -> dict[str, float]:
    """HF generate: the weights, and a KV cache that grows to max_len for each of the batch's sequences."""
    return {"weights": shape.params() * dtype_bytes, "kv_cache": batch * max_len * shape.kv_bytes_per_token(
        dtype_bytes), "activations": batch * shape.vocab * 4 * 2}
