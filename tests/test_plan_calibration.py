"""The planner's memory terms against what the Megatron engine really allocates on CPU (real gloo ranks), layout by
layout: TP 1 and 2 (sequence parallel), CP 2, recomputation none / selective / full, fp32 and bf16 (with bf16 and
with fp32 gradients).

Static terms are read off the engine's own tensors (the model's parameters, Megatron's gradient buffers, the
distributed optimizer's states after a step, the reference model) and must equal the planner's to the byte. The
activations are the bytes autograd keeps from one micro-batch's forward pass (``tests/memory_meter.SavedBytes``):
within 3% (measured: within 0.3%). The log-prob chunks' working set is the peak of what their forward and backward
allocate (``LiveBytes``), at two chunk sizes: within 20% (measured: 3-16%).
"""

from __future__ import annotations

import pytest
import torch

from r1.plan.shape import ModelShape
from r1.plan.train_memory import (
    TrainLayout,
    activation_bytes_per_token_layer,
    local_attention_mask_bytes,
    logprob_working_bytes,
    megatron_memory,
    outside_layers_bytes_per_token,
    padded_vocab,
)
from tests.gloo_ranks import run_ranks

pytestmark = pytest.mark.slow

H, I, LAYERS, HEADS, KV, VOCAB, SEQ = 256, 704, 2, 8, 2, 1001, 384


def _save(path, tied: bool) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=H, intermediate_size=I, num_hidden_layers=LAYERS,
                                 num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=4096,
                                 tie_word_embeddings=tied, rope_theta=1e4)).save_pretrained(path)
    return str(path)


def _shape(tied: bool) -> ModelShape:
    return ModelShape("calibration", H, I, LAYERS, HEADS, KV, VOCAB, tied, True, 4096)


def _optimizer_bytes(engine) -> int:
    """Adam's moments, and the fp32 master copies and their gradients where they are tensors of their own (bf16
    runs: the masters always, their gradients where the gradient buffer is bf16); fp32 parameters are their own
    masters (views of the parameter buffer), fp32 gradients views of the gradient buffer."""
    params = {p.untyped_storage().data_ptr() for c in engine.chunks for p in c.parameters()}
    params |= {b.param_data.untyped_storage().data_ptr() for c in engine.chunks for b in c.buffers}
    params |= {b.grad_data.untyped_storage().data_ptr() for c in engine.chunks for b in c.buffers}
    total, seen = 0, set()
    for opt in getattr(engine.optimizer, "chained_optimizers", [engine.optimizer]):
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                for tensor in (p, p.grad):
                    if tensor is None:
                        continue
                    ptr = tensor.untyped_storage().data_ptr()
                    if ptr not in params and (ptr, tensor.storage_offset()) not in seen:
                        seen.add((ptr, tensor.storage_offset()))
                        total += tensor.numel() * tensor.element_size()
                total += sum(v.numel() * v.element_size() for v in opt.optimizer.state.get(p, {}).values()
                             if torch.is_tensor(v) and v.dim() > 0)
    return total


def _measure(rank: int, world: int, hf_dir: str, layouts: list[dict]) -> list[dict]:
    """Each layout in turn on these ranks: its engine's static bytes, one forward's saved bytes, the log-prob
    chunk's peak."""
    from megatron.core import parallel_state
    from megatron.core.packed_seq_params import PackedSeqParams

    from r1.algo import GRPOLoss
    from r1.engines.megatron.engine import MegatronTrainEngine, _output_weight, _unwrap
    from r1.engines.megatron.layout import ParallelLayout
    from r1.engines.megatron.logprobs import vocab_parallel_logprobs
    from r1.engines.megatron.packing import cp_local_indices
    from r1.types import TrainBatch
    from tests.memory_meter import LiveBytes, SavedBytes

    out = []
    for spec in layouts:
        engine = MegatronTrainEngine(
            hf_dir, layout=ParallelLayout(tp=spec["tp"], cp=spec["cp"]), lr=1e-3, betas=(0.9, 0.99),
            weight_decay=0.0, warmup_steps=0, grad_clip=1.0, micro_batch_tokens=SEQ, with_reference=True,
            dtype=spec["dtype"], recompute=spec["recompute"], logprob_chunk_tokens=96,
            grad_reduce_in_fp32=spec.get("grad_fp32", False))
        params = [p for c in engine.chunks for p in c.parameters()]
        buffers = [b for c in engine.chunks for b in c.buffers]
        reference = [p for c in engine.reference for p in c.parameters()]
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, VOCAB - 1, (1, SEQ), generator=g)
        response = torch.zeros(1, SEQ)
        response[:, 8:] = 1
        batch = TrainBatch(ids, torch.ones(1, SEQ, dtype=torch.long), response, torch.randn(1, generator=g),
                           rollout_logprobs=-torch.rand(1, SEQ, generator=g) * response)
        engine.train_step(batch, GRPOLoss(clip_low=0.2, clip_high=0.2, agg="token_mean", kl_coef=0.001,
                                          kl_kind="k3", kl_in_loss=True))  # (Adam's states exist after a step)
        measured = {
            "weights": sum(p.numel() * p.element_size() for p in params),
            "gradients": sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers),
            "optimizer": _optimizer_bytes(engine),
            "reference": sum(p.numel() * p.element_size() for p in reference),
        }
        mb = engine._micro_batches(batch)[0]
        local = cp_local_indices(mb.cu_seqlens, spec["cp"], engine.cp_rank)
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=mb.cu_seqlens, cu_seqlens_kv=mb.cu_seqlens,
                                 max_seqlen_q=mb.max_seqlen, max_seqlen_kv=mb.max_seqlen, cp_group=engine.cp_group)
        with SavedBytes(params + reference + [b.grad_data for b in buffers]) as saved:
            hidden = engine.chunks[0](input_ids=mb.input_ids[local][None], position_ids=mb.pos_of[local][None],
                                      attention_mask=None, packed_seq_params=packed)
        measured["activations"] = saved.bytes
        measured["tokens"] = len(local)
        del hidden
        # the log-prob chunks alone: 4 chunks of 96 tokens through the output layer, forward and backward
        weight = _output_weight(_unwrap(engine.chunks[0]))
        for chunk in (96, 192):  # (the same 384 tokens in chunks of 96 and of 192)
            states = torch.randn(SEQ, H, requires_grad=True)
            targets = torch.randint(0, VOCAB, (SEQ,), generator=g)
            with LiveBytes() as live:
                logp, _ = vocab_parallel_logprobs(states, weight, targets, vocab_size=VOCAB, chunk_tokens=chunk,
                                                  with_entropy=True)
                logp.sum().backward()
            measured[f"logprob_peak_{chunk}"] = live.peak
        measured["vocab_local"] = weight.shape[0]
        out.append(measured)
        del engine
        parallel_state.destroy_model_parallel()
    return out


def _check(measured: dict, spec: dict, tied: bool) -> None:
    shape = _shape(tied)
    lay = TrainLayout(tp=spec["tp"], cp=spec["cp"], dp=1, recompute=spec["recompute"], sequence_parallel=True,
                      bf16=spec["dtype"] == "bfloat16", grad_fp32=spec.get("grad_fp32", False),
                      micro_batch_tokens=SEQ, logprob_chunk_tokens=96,
                      transformer_engine=False)
    terms = megatron_memory(shape, lay, SEQ)
    for key in ("weights", "gradients", "optimizer", "reference"):
        assert measured[key] == terms[key], (key, spec)
    tokens = measured["tokens"]
    assert tokens == SEQ // spec["cp"]
    predicted = LAYERS * (activation_bytes_per_token_layer(shape, lay) * tokens
                          + local_attention_mask_bytes(tokens, lay)) + outside_layers_bytes_per_token(shape) * tokens
    assert measured["activations"] == pytest.approx(predicted, rel=0.03), spec
    assert measured["vocab_local"] == padded_vocab(shape, spec["tp"]) // spec["tp"]
    for chunk in (96, 192):
        predicted = logprob_working_bytes(shape, TrainLayout(tp=spec["tp"], bf16=lay.bf16, logprob_chunk_tokens=chunk),
                                          SEQ)
        assert measured[f"logprob_peak_{chunk}"] == pytest.approx(predicted, rel=0.2), (chunk, spec)


ONE_RANK = [{"tp": 1, "cp": 1, "recompute": "none", "dtype": "float32"},
            {"tp": 1, "cp": 1, "recompute": "full", "dtype": "bfloat16", "grad_fp32": True},
            {"tp": 1, "cp": 1, "recompute": "selective", "dtype": "bfloat16"}]
TWO_RANKS = [{"tp": 2, "cp": 1, "recompute": "none", "dtype": "bfloat16"},
             {"tp": 2, "cp": 1, "recompute": "full", "dtype": "float32"},
             {"tp": 1, "cp": 2, "recompute": "none", "dtype": "float32"}]


def test_memory_terms_on_one_rank_equal_what_megatron_allocates(tmp_path):
    hf_dir = _save(tmp_path / "hf", tied=False)
    for spec, measured in zip(ONE_RANK, run_ranks(_measure, 1, hf_dir, ONE_RANK, tmp_path=tmp_path)[0]):
        _check(measured, spec, tied=False)


def test_memory_terms_with_tensor_and_context_parallelism_equal_what_megatron_allocates(tmp_path):
    """TP 2 with sequence parallelism (the vocabulary of 1001 padded to 1002, tied embeddings) and CP 2 (the
    optimizer sharded over DP x CP; attention's keys gathered from both ranks, its mask quadratic): every rank."""
    hf_dir = _save(tmp_path / "hf", tied=True)
    for rank_results in run_ranks(_measure, 2, hf_dir, TWO_RANKS, tmp_path=tmp_path):
        for spec, measured in zip(TWO_RANKS, rank_results):
            _check(measured, spec, tied=True)
