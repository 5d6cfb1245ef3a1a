"""Shared fixtures: a tiny offline model (built by the same code as the default) and a local Ray instance."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("WANDB_SILENT", "true")
REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"


def compose(overrides: list[str] | None = None):
    """The launcher's config (schema + conf/ + overrides) as the driver receives it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from launcher.main import to_plain
    from r1.config.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []), return_hydra_config=False)
    return to_plain(cfg)


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
    from r1.setup import prepare_model

    cfg = compose(TINY + [f"cache_dir={cache_dir}", "run_dir=unused"])
    return prepare_model(cfg)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    ray.shutdown()
