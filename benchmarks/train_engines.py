"""Benchmark: the Megatron train engine against the HF train engine on the default experiment.

    .venv/bin/python benchmarks/train_engines.py [--steps 8] [--warmup 2] [hydra overrides ...]

Runs the real driver (``r1.driver.run``, Ray pools, weight sync) on the embedded default experiment once per train
engine: ``trainer=hf``, ``trainer=megatron`` (TP=1) and ``trainer=megatron`` at TP=2 (two training ranks; on a
2-core machine they share the cores with the rollout workers). At ``trainer.lr=0`` the policy stays the base
model, so every run generates responses of the same length distribution and the engines do the same work.

Prints a table (the training call's seconds and tokens/s, its forward/backward/optimizer split, the weight sync);
copy it, with machine and date, into benchmarks/RESULTS.md. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
ENGINES = {
    "hf": ["trainer=hf"],
    "megatron tp1": ["trainer=megatron"],
    "megatron tp2": ["trainer=megatron", "trainer.num_workers=2", "trainer.megatron.tensor_parallel=2",
                     "trainer.torch_threads=1"],
}


def run_engine(overrides: list[str], steps: int, warmup: int) -> dict[str, float]:
    # benchmarks/overhead.py: the real driver on a config, and its per-step metrics
    from overhead import r1_steps

    from launcher.main import compose

    run_dir = Path(tempfile.mkdtemp(prefix="r1-bench-"))
    cfg = compose([f"run_dir={run_dir}", "logger=none", f"trainer.total_steps={steps}", "eval.at_start=false",
                   "eval.every_steps=0", "checkpoint.every_steps=0", "trainer.lr=0", *overrides])
    rows = r1_steps(cfg)[warmup:]
    keys = ("time/step_s", "time/train_s", "perf/train_tokens", "time/trainer_forward_s",
            "time/trainer_backward_s", "time/trainer_optimizer_s", "time/trainer_ray_s", "time/sync_s")
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


def main() -> None:
    sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="leading steps left out of the means")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. cache_dir=/path")
    args = ap.parse_args()
    results = {name: run_engine(ENGINES[name] + args.overrides, args.steps, args.warmup)
               for name in args.engines.split(",")}
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads; date {time.strftime('%Y-%m-%d')}; "
          f"steps {args.warmup + 1}-{args.steps} of {args.steps}\n")
    print("| engine | step s | train s | train tokens/s | forward s | backward s | optimizer s | Ray s | sync s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, m in results.items():
        print(f"| {name} | {m['time/step_s']:.2f} | {m['time/train_s']:.2f} | "
              f"{m['perf/train_tokens'] / m['time/train_s']:.0f} | {m['time/trainer_forward_s']:.3f} | "
              f"{m['time/trainer_backward_s']:.3f} | {m['time/trainer_optimizer_s']:.3f} | "
              f"{m['time/trainer_ray_s']:.3f} | {m['time/sync_s']:.3f} |")


if __name__ == "__main__":
    main()
