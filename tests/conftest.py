"""Shared fixtures: a tiny offline model (built by the same code as the default) and a local Ray instance."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

from launcher.main import compose

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("WANDB_SILENT", "true")
REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"


TINY = [
    "logger=none",
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=2",
    "model.tiny.num_kv_heads=1",
    "model.tiny.pretrain_steps=3",
    "model.tiny.pretrain_docs=300",
    "model.tiny.pretrain_batch_size=8",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("r1_cache")


@pytest.fixture(scope="session")
def tiny_model(cache_dir) -> str:
    """A ~20K-parameter Qwen2 model + tokenizer, built offline through r1's own tiny-model path."""
    from r1.inputs import prepare_model

    cfg = compose(TINY + [f"cache_dir={cache_dir}", "run_dir=unused"])
    return prepare_model(cfg)


@pytest.fixture(scope="session")
def tiny_llama(cache_dir) -> str:
    """The same, with Llama 3's token conventions (BOS from the tokenizer, no pad token, untied lm_head)."""
    from r1.inputs import prepare_model

    return prepare_model(compose(TINY + ["model=tiny_llama", f"cache_dir={cache_dir}", "run_dir=unused"]))


# vLLM's CPU attention needs a head dimension of 32 or more: the same tiny models with one attention head
TINY_VLLM = TINY + ["model.tiny.num_heads=1"]


@pytest.fixture(scope="session")
def vllm_qwen2(cache_dir) -> str:
    """Tiny Qwen2 (tied embeddings) that vLLM can serve."""
    from r1.inputs import prepare_model

    return prepare_model(compose(TINY_VLLM + [f"cache_dir={cache_dir}", "run_dir=unused"]))


@pytest.fixture(scope="session")
def vllm_llama(cache_dir) -> str:
    """Tiny Llama 3 (untied lm_head, BOS, no pad) that vLLM can serve."""
    from r1.inputs import prepare_model

    return prepare_model(compose(TINY_VLLM + ["model=tiny_llama", f"cache_dir={cache_dir}", "run_dir=unused"]))


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    ray.shutdown()


@contextmanager
def pools(cfg, model_path):
    """A training pool, a rollout pool and their sync group, as the driver builds them; shut down afterwards."""
    from r1.workers.pools import RolloutPool, TrainPool
    from r1.workers.weight_sync import WeightSync

    train, rollout = TrainPool(cfg, model_path), RolloutPool(cfg, model_path)
    try:
        yield train, rollout, WeightSync(train, rollout)
    finally:
        rollout.shutdown()
        train.shutdown()

