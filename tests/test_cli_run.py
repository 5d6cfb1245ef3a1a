"""`r1-launch` as a user runs it: its own Ray instance (no fixture), real offline W&B, then a resume.

This is the path of the README's first command; the in-process end-to-end tests share a Ray fixture and would not
notice if the launcher stopped starting Ray itself.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY
from tests.wandb_records import read_run

pytestmark = pytest.mark.slow

SECRET = "hf_r1_test_secret_do_not_log"


def _launch(cache_dir, run_dir, total_steps, *extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"HF_TOKEN": SECRET, "WANDB_SILENT": "true", "RAY_DEDUP_LOGS": "0"})
    args = [a for a in TINY if not a.startswith("logger=")] + [
        "logger=wandb", f"cache_dir={cache_dir}", f"run_dir={run_dir}", f"trainer.total_steps={total_steps}",
        "algo.prompts_per_step=2", "algo.group_size=2", "eval.k=2", "eval.max_problems=4", "eval.every_steps=0",
        "eval.max_new_tokens=12", "rollout.length_schedule=[{from_step: 0, max_tokens: 12}]",
        "rollout.num_workers=1", "checkpoint.every_steps=1", *extra,
    ]
    proc = subprocess.run([sys.executable, "-m", "launcher.main", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _wandb_runs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_launcher_runs_with_offline_wandb_and_resumes_the_same_wandb_run(tiny_model, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    _launch(cache_dir, run_dir, 2)

    [first] = _wandb_runs(run_dir)
    logged = read_run(first)
    assert logged["config"]["algo"]["group_size"] == 2 and logged["config"]["logger"]["backend"] == "wandb"
    by_step = {h["_step"]: h for h in logged["history"]}
    assert set(by_step) == {0, 1, 2}
    for key in ("reward/mean", "reward/accuracy", "reward/format", "train/kl", "train/entropy",
                "train/clip_fraction", "train/grad_norm", "response/length_mean", "time/generate_s",
                "time/train_s", "time/sync_s", "perf/gen_tokens_per_s", "perf/train_tokens_per_s"):
        assert key in by_step[1], key
    for key in ("eval/pass@1", "eval/cons@2", "eval/format_rate", "eval/response_length"):
        assert key in by_step[0] and key in by_step[2], key
    # W&B holds what metrics.jsonl holds
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step1 = next(m for m in jsonl if m["step"] == 1 and "reward/mean" in m)
    assert by_step[1]["reward/mean"] == pytest.approx(step1["reward/mean"])

    # Resume: the same W&B run id continues at the next step.
    _launch(cache_dir, run_dir, 3, "resume=true", "eval.at_start=false")
    runs = _wandb_runs(run_dir)
    assert len(runs) == 2
    resumed = read_run(runs[-1])
    assert resumed["run_id"] == logged["run_id"]
    assert min(h["_step"] for h in resumed["history"]) == 3

    # No secret from the environment reaches anything the run wrote (logs, config, W&B files).
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
