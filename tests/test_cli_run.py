"""`r1-launch` as a user runs it: its own Ray instance (no fixture), real offline W&B, then a resume.

This is the path of the README's first command; the in-process end-to-end tests share a Ray fixture and would not
notice if the launcher stopped starting Ray itself.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, kill_when
from tests.wandb_records import read_run

pytestmark = pytest.mark.slow

SECRET = "hf_r1_test_secret_do_not_log"


def test_a_run_killed_between_checkpoints_resumes_with_each_step_once(tiny_model, cache_dir, tmp_path):
    """SIGKILL (a lost node: no handler runs) after step 3 is logged, the last checkpoint at step 2, groups in flight
    (max_staleness=1). resume=true redoes step 3: metrics.jsonl and groups.jsonl hold every step once, W&B (real,
    offline) continues the same run at step 3 with what metrics.jsonl holds, no secret from the environment reaches
    any file, and the trajectory equals an uninterrupted run's: the groups each step trained, their rewards and the
    final weights bit for bit."""
    import torch
    from safetensors.torch import load_file

    from r1.monitoring.ledger import read_ledger
    from r1.monitoring.loggers import wandb_run_id
    from r1.workers.rollout_buffer import outstanding_uids

    run_dir, straight = tmp_path / "killed", tmp_path / "straight"
    common = ["trainer.total_steps=4", "checkpoint.every_steps=2", "algo.max_staleness=1",
              "rollout.groups_per_request=1", "eval.at_start=false", "checkpoint.keep_last=5"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"HF_TOKEN": SECRET, "WANDB_SILENT": "true", "RAY_DEDUP_LOGS": "0"})
    args = [a for a in TINY if not a.startswith("logger=")] + [
        f"cache_dir={cache_dir}", "algo.prompts_per_step=2", "algo.group_size=2", "eval.k=2", "eval.max_problems=2",
        "eval.every_steps=0", "eval.max_new_tokens=12", "rollout.length_schedule=[{from_step: 0, max_tokens: 12}]",
        "rollout.num_workers=2", *common]
    proc = subprocess.Popen([sys.executable, "-m", "launcher.main", *args, "logger=wandb", f"run_dir={run_dir}",
                             "trainer.simulated_update_s=1.5"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def logged_step_3() -> bool:
        metrics = run_dir / "metrics.jsonl"
        return metrics.exists() and any(json.loads(x)["step"] == 3 for x in metrics.read_text().splitlines())

    kill_when(proc, logged_step_3)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000002", "killed too late"
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    state = json.loads((run_dir / "checkpoints" / "step_000002" / "driver_state.json").read_text())["buffer"]
    assert {4, 5} <= set(outstanding_uids(state)), "batch 3, in flight at the checkpoint, is kept to be trained"

    resumed = subprocess.run([sys.executable, "-m", "launcher.main", *args, "logger=wandb", f"run_dir={run_dir}",
                              "resume=true"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                             check=False)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval/pass@1" in r] == [4]
    ledger = read_ledger(run_dir)
    assert sorted(r["step"] for r in ledger) == [1, 1, 2, 2, 3, 3, 4, 4]
    assert len({r["uid"] for r in ledger}) == len(ledger)

    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_runs) == 2
    again = read_run(wandb_runs[-1])
    assert again["run_id"] == wandb_run_id(run_dir)
    assert again["config"]["algo"]["group_size"] == 2 and again["config"]["logger"]["backend"] == "wandb"
    logged = {h["_step"]: h for h in again["history"]}
    assert min(logged) == 3 and logged[3]["reward/mean"] == pytest.approx(rows[2]["reward/mean"])
    step_4 = next(r for r in rows if r["step"] == 4 and "reward/mean" in r)
    for key in ("reward/mean", "reward/accuracy", "reward/format", "train/kl", "train/entropy",
                "train/clip_fraction", "train/grad_norm", "response/length_mean", "time/generate_s",
                "time/train_s", "time/sync_s", "perf/gen_tokens_per_s", "perf/train_tokens_per_s"):
        assert logged[4][key] == pytest.approx(step_4[key]), key
    evaluated = next(r for r in rows if "eval/pass@1" in r)
    for key in ("eval/pass@1", "eval/cons@2", "eval/format_rate", "eval/response_length"):
        assert logged[4][key] == pytest.approx(evaluated[key]), key
    for path in run_dir.rglob("*"):  # logs, config, checkpoints, W&B files
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path

    done = subprocess.run([sys.executable, "-m", "launcher.main", *args, "logger=none", f"run_dir={straight}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    uninterrupted = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/mean"] for r in uninterrupted if "reward/mean" in r] == \
        [r["reward/mean"] for r in rows if "reward/mean" in r]
    assert [(r["step"], r["uid"]) for r in read_ledger(straight)] == [(r["step"], r["uid"]) for r in ledger]
    a, b = (load_file(str(d / "checkpoints" / "step_000004" / "policy" / "model.safetensors")) for d in (run_dir, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_local_run_starts_its_own_ray_even_where_ray_start_recorded_another_cluster(tmp_path):
    """`ray start` records its cluster in <ray temp>/ray_current_cluster, and a bare ray.init() joins that cluster (and
    refuses num_cpus there): how CI's local runs failed while a Slurm test's Ray was up. cluster=local must start a
    private instance whatever is recorded."""
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="r1ray", dir="/tmp"))  # short: Ray's socket paths live under it
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")  # another cluster's GCS, as `ray start` writes
    script = (
        "import ray; from types import SimpleNamespace as N; from r1.cluster import connect; "
        "print(connect(N(kind='local', ray_address=None, num_cpus=3, num_gpus=0))); "
        "print(ray.get_runtime_context().gcs_address); print(ray.cluster_resources()['CPU']); ray.shutdown()"
    )
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300, check=False)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    owns, gcs, cpus = proc.stdout.split()[-3:]
    assert owns == "True" and gcs != "127.0.0.1:1" and float(cpus) == 3.0
