"""Engine choice by config name. New engines (Megatron-core, vLLM) register here and nowhere else."""

from __future__ import annotations

TRAIN_ENGINES = ("hf", "megatron")
ROLLOUT_ENGINES = ("hf", "vllm")


def build_train_engine(cfg, model_path: str):
    """The engine of one training rank (called on every rank, after the pool's process group is formed)."""
    t = cfg.trainer
    common = {
        "lr": t.lr, "betas": tuple(t.adam_betas), "weight_decay": t.weight_decay, "warmup_steps": t.warmup_steps,
        "grad_clip": t.grad_clip, "dtype": cfg.model.dtype,
        "seed": t.seed,
        # (GRPO's KL term reads the reference policy; SFT has none)
        "with_reference": cfg.stage == "grpo" and cfg.algo.kl_placement != "none" and cfg.algo.kl_coef > 0,
    }
    if t.engine == "hf":
        from r1.engines.hf_train import HFTrainEngine

        return HFTrainEngine(model_path, micro_batch_size=t.micro_batch_size,
                             micro_batch_tokens=t.micro_batch_tokens, **common)
    if t.engine == "megatron":
        from r1.engines.megatron.engine import MegatronTrainEngine
        from r1.engines.megatron.layout import ParallelLayout

        m = t.megatron
        return MegatronTrainEngine(
            model_path, layout=ParallelLayout(tp=m.tensor_parallel, pp=m.pipeline_parallel, cp=m.context_parallel),
            micro_batch_tokens=m.micro_batch_tokens, logprob_chunk_tokens=m.logprob_chunk_tokens,
            recompute=m.recompute, sequence_parallel=m.sequence_parallel, overlap_grad_reduce=m.overlap_grad_reduce,
            grad_reduce_in_fp32=m.grad_reduce_in_fp32, **common)
    raise ValueError(f"trainer.engine={cfg.trainer.engine!r} is not available; choose one of {TRAIN_ENGINES}")


def build_rollout_engine(cfg, model_path: str, index: int = 0):
    """The engine of rollout worker ``index`` (engines on one CPU machine each get their own cores)."""
    r = cfg.rollout
    if r.engine == "hf":
        from r1.engines.hf_rollout import HFRolloutEngine

        return HFRolloutEngine(model_path, generate_batch_size=r.generate_batch_size, dtype=cfg.model.dtype,
                               decode_step_s=r.simulated_decode_step_s)
    if r.engine == "vllm":
        from r1.engines.vllm_rollout import VLLMRolloutEngine, cpu_cores_of

        v = r.vllm
        return VLLMRolloutEngine(
            model_path, dtype=cfg.model.dtype, tensor_parallel_size=v.tensor_parallel_size,
            max_model_len=v.max_model_len, kv_cache_mb=v.kv_cache_mb,
            gpu_memory_utilization=v.gpu_memory_utilization, max_num_seqs=v.max_num_seqs,
            enforce_eager=v.enforce_eager, seed=cfg.seed * 1009 + index,
            max_tokens=max([s.max_tokens for s in r.length_schedule] + [cfg.eval.max_new_tokens]),
            update_timeout_s=r.stall_timeout_s,
            cpu_cores=None if r.gpus_per_worker > 0 else cpu_cores_of(index, v.tensor_parallel_size, max(1, r.torch_threads)),
        )
    raise ValueError(f"rollout.engine={r.engine!r} is not available; choose one of {ROLLOUT_ENGINES}")
