"""Shared fixtures: a tiny offline model (built by the same code as the default) and a local Ray instance."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager, suppress
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
    "model.tiny.select_band=null",  # 3 steps: a plumbing model, not the demo's selected base
]


@pytest.fixture(scope="session")
def bwrap():
    """bubblewrap from Debian, for the code sandbox (installed here with apt where this runs as root, as CI does)."""
    from r1.rewards.sandbox import bwrap_binary

    if bwrap_binary() is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "bubblewrap"], capture_output=True, check=False,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=600)
    if bwrap_binary() is None:
        pytest.skip("the code sandbox needs bubblewrap: `apt-get install bubblewrap`")


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

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_with_gpus(ray_local):
    """Ray with 2 declared GPUs (Ray only counts them here: each worker that asks gets an id in
    CUDA_VISIBLE_DEVICES, which shows where Ray placed it). Restarts the session's Ray; later tests get the same
    Ray with GPUs to spare."""
    ray = ray_local
    if ray.cluster_resources().get("GPU", 0) < 2:
        ray.shutdown()
        ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    return ray


@contextmanager
def pools(cfg, model_path):
    """A training pool, a rollout pool and their sync group, as the driver builds them; shut down afterwards."""
    from r1.workers.pools import RolloutPool, TrainPool, colocated
    from r1.workers.weight_sync import WeightSync

    train = TrainPool(cfg, model_path)
    rollout = RolloutPool(cfg, model_path, colocate_with=train if colocated(cfg) else None)
    try:
        yield train, rollout, WeightSync(train, rollout)
    finally:
        rollout.shutdown()
        train.shutdown()


def kill_when(proc, ready, timeout_s: float = 300) -> None:
    """SIGKILL ``proc`` and every process under it (a lost node: no handler runs) once ``ready()`` is true; whatever
    fails, no ``launcher.main`` run of this test is left behind."""
    import signal
    import time

    import psutil

    try:
        deadline = time.time() + timeout_s
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
        if proc.poll() is not None:
            raise AssertionError(f"the run exited (code {proc.returncode}) before the point where the test kills it")
        tree = [proc, *psutil.Process(proc.pid).children(recursive=True)]
        for p in tree:
            p.send_signal(signal.SIGKILL)
        psutil.wait_procs(tree, timeout=30)
    finally:
        for p in psutil.Process().children(recursive=True):
            with suppress(psutil.Error):  # (gone, or a zombie another test left unreaped)
                if "launcher.main" in " ".join(p.cmdline()):
                    p.kill()


# pytest-xdist (--dist loadfile) hands whole files to its workers, those with the most tests first (its default
# --loadscope-reorder; the sort is stable, so files with as many tests keep this order). Handing out the longest
# files first instead (--no-loadscope-reorder) was measured slower on 2 cores: 37.7 min against 31.4, since two
# system tests then run at once from the start, each with its own Ray, engines and workers.
LONGEST_FIRST = ("test_vllm.py", "test_slurm.py", "test_pipeline.py", "test_async.py", "test_health.py",
                 "test_cli_run.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (stable: a file's tests keep their order)
