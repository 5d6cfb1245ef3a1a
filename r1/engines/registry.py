"""Engine choice by config name. New engines (Megatron-core, vLLM) register here and nowhere else."""

from __future__ import annotations

TRAIN_ENGINES = ("hf",)
ROLLOUT_ENGINES = ("hf",)


def build_train_engine(cfg, model_path: str):
    if cfg.trainer.engine == "hf":
        from r1.engines.hf_train import HFTrainEngine

        return HFTrainEngine(
            model_path,
            lr=cfg.trainer.lr,
            betas=tuple(cfg.trainer.adam_betas),
            weight_decay=cfg.trainer.weight_decay,
            warmup_steps=cfg.trainer.warmup_steps,
            grad_clip=cfg.trainer.grad_clip,
            micro_batch_size=cfg.trainer.micro_batch_size,
            with_reference=cfg.algo.kl_placement != "none" and cfg.algo.kl_coef > 0,
            dtype=cfg.model.dtype,
            seed=cfg.trainer.seed,
        )
    raise ValueError(f"trainer.engine={cfg.trainer.engine!r} is not available; choose one of {TRAIN_ENGINES}")


def build_rollout_engine(cfg, model_path: str):
    if cfg.rollout.engine == "hf":
        from r1.engines.hf_rollout import HFRolloutEngine

        return HFRolloutEngine(model_path, generate_batch_size=cfg.rollout.generate_batch_size, dtype=cfg.model.dtype)
    raise ValueError(f"rollout.engine={cfg.rollout.engine!r} is not available; choose one of {ROLLOUT_ENGINES}")
