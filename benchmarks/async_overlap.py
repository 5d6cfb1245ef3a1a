"""Benchmark: synchronous vs asynchronous GRPO (``algo.max_staleness`` 0 / 1 / 2).

    .venv/bin/python benchmarks/async_overlap.py [--steps 10] [--skip-real] [--skip-calibrated]

Two parts, one Ray instance, one table each (copy them, with machine and date, into benchmarks/RESULTS.md):

1. *Real*: the default tiny experiment at each staleness bound: step time, tokens/s, ratio to the synchronous run.
   On a 2-core machine both pools share the same cores, so real overlap is limited by the hardware, not the loop.
2. *Calibrated*: a ~20K-parameter model (compute ~ 0) whose decode steps and updates take set times
   (``rollout.simulated_decode_step_s``, ``trainer.simulated_update_s``), so generation time G and training time T
   per step are known: the synchronous loop should take G + T, the asynchronous one max(G, T). This measures the
   orchestration itself (buffer, Ray calls, staged weight sync) against its ideal; target async <= 1.05 x max(G, T).

Step time is the wall-clock period between consecutive step logs; other columns are means over steps after the first
two (warm-up). Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import ray

REPO = Path(__file__).resolve().parent.parent
TINY_COMPUTE = [  # the test suite's ~20K-parameter model: compute is negligible next to the emulated latencies
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=2",
    "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "model.tiny.pretrain_steps=3",
    "model.tiny.pretrain_docs=300", "model.tiny.pretrain_batch_size=8", "model.tiny.select_band=null",
]


def run_steps(overrides: list[str], steps: int) -> dict[str, float]:
    from launcher.main import compose
    from r1.driver import run

    run_dir = Path(tempfile.mkdtemp(prefix="r1-async-bench-"))
    cfg = compose([f"run_dir={run_dir}", "logger=none", f"trainer.total_steps={steps}", "eval.at_start=false",
                   "eval.every_steps=0", "eval.max_problems=2", "eval.k=1", "checkpoint.every_steps=0",
                   *overrides])
    run(cfg)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward/mean" in r]
    # the step period: wall time between consecutive step logs (everything the loop does, logging included)
    step_s = (rows[-1]["time"] - rows[1]["time"]) / (len(rows) - 2)
    rows = rows[2:]

    def mean(key):
        return sum(r[key] for r in rows) / len(rows)

    gen_tokens = sum(r["response/length_mean"] for r in rows) / len(rows) * cfg.algo.group_size * \
        cfg.algo.prompts_per_step
    return {
        "step_s": step_s, "gen_s": mean("time/generate_s"), "train_s": mean("time/train_s"),
        "sync_s": mean("time/sync_s"), "rollout_idle_s": mean("time/rollout_idle_s"),
        "train_idle_s": mean("time/train_idle_s"), "tokens_per_s": gen_tokens / step_s,
        "staleness": mean("staleness/mean"), "efficiency": mean("perf/overlap_efficiency"),
    }


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    sys.path.insert(0, str(REPO))
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--skip-calibrated", action="store_true")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. cache_dir=/path")
    args = ap.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    out = [(f"machine: {platform.machine()}, {os.cpu_count()} cores; date: {time.strftime('%Y-%m-%d')}; "
            f"{args.steps} steps per run, means over steps 3..{args.steps}")]

    if not args.skip_real:
        rows, base = [], None
        for s in (0, 1, 2):
            r = run_steps([f"algo.max_staleness={s}", *args.overrides], args.steps)
            base = base or r["step_s"]
            rows.append([str(s), f"{r['step_s']:.2f}", f"{r['gen_s']:.2f}", f"{r['train_s']:.2f}",
                         f"{r['tokens_per_s']:.0f}", f"{r['staleness']:.2f}", f"{base / r['step_s']:.2f}x"])
        out.append(table("Real: default tiny experiment (16 prompts x 8, <= 64 tokens)",
                         ["max_staleness", "step (s)", "generate (s)", "train (s)", "gen tokens/s",
                          "mean staleness", "speed-up vs sync"], rows))

    if not args.skip_calibrated:
        rows = []
        max_tokens, prompts, workers = 16, 8, 2
        for gen_target, train_target in ((1.0, 1.0), (1.5, 0.75), (0.75, 1.5)):
            decode_step = gen_target / max_tokens  # one request per worker per step, each max_tokens decode steps
            common = TINY_COMPUTE + [
                f"rollout.length_schedule=[{{from_step: 0, max_tokens: {max_tokens}}}]",
                f"rollout.simulated_decode_step_s={decode_step}", f"trainer.simulated_update_s={train_target}",
                f"algo.prompts_per_step={prompts}", "algo.group_size=4", f"rollout.num_workers={workers}",
                f"rollout.groups_per_request={prompts // workers}", *args.overrides,
            ]
            ideal_async = max(gen_target, train_target)
            for s in (0, 1, 2):
                r = run_steps([f"algo.max_staleness={s}", *common], args.steps)
                ideal = gen_target + train_target if s == 0 else ideal_async
                rows.append([
                    f"{gen_target:.2f} / {train_target:.2f}", str(s), f"{r['gen_s']:.2f} / {r['train_s']:.2f}",
                    f"{r['step_s']:.3f}", f"{ideal:.2f}", f"{r['step_s'] / ideal_async:.3f}",
                    f"{r['step_s'] / max(r['gen_s'], r['train_s']):.3f}",
                    f"{r['rollout_idle_s']:.2f} / {r['train_idle_s']:.2f}",
                ])
        out.append(table(
            "Calibrated: emulated generation G and training T per step (orchestration overhead only)",
            ["set G / T (s)", "max_staleness", "measured gen / train (s)", "step (s)", "ideal (s)",
             "step / max(set G,T)", "step / max(measured gen, train)", "idle rollout / train (s)"], rows))
    ray.shutdown()
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
