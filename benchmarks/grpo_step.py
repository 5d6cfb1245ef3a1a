"""Benchmark: GRPO steps of the default experiment, and weight-sync bandwidth vs a raw gloo broadcast.

    .venv/bin/python benchmarks/grpo_step.py [--steps 3] [--warmup 1] [hydra overrides ...]

Prints a table; copy it, with machine and date, into benchmarks/RESULTS.md. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import ray
import torch

REPO = Path(__file__).resolve().parent.parent


class RawPeer:
    def __init__(self, rank, world, host, port, numel):
        from r1.distributed.bucketed_broadcast import BroadcastGroup

        self.group = BroadcastGroup(host, port, rank, world, backend="gloo", timeout_s=120)
        self.t = torch.ones(numel)

    def bcast(self, reps):
        start = time.perf_counter()
        for _ in range(reps):
            self.group._broadcast(self.t)
        return (time.perf_counter() - start) / reps


def main() -> None:
    import sys

    sys.path.insert(0, str(REPO))
    from launcher.main import compose
    from r1.driver import run

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="leading steps left out of the means")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. cache_dir=/path")
    args = ap.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="r1-bench-"))
    cfg = compose([f"run_dir={run_dir}", "logger=none", f"trainer.total_steps={args.steps}", "eval.at_start=false",
                   "eval.max_problems=8", "checkpoint.every_steps=0", *args.overrides])
    ray.init(address="local", num_cpus=cfg.cluster.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    run(cfg)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r][args.warmup:] or [r for r in rows if "reward/mean" in r]

    def mean(key):
        return sum(r[key] for r in steps) / len(steps)

    from transformers import AutoModelForCausalLM

    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    model_path = json.loads((latest / "driver_state.json").read_text())["model_path"]
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_path).parameters())
    sync_bytes = n_params * 4
    from r1.distributed.bucketed_broadcast import free_port

    world = 1 + cfg.rollout.num_workers
    port = free_port()
    Peer = ray.remote(num_cpus=0.5)(RawPeer)
    peers = [Peer.remote(r, world, "127.0.0.1", port, n_params) for r in range(world)]
    raw_s = max(ray.get([p.bcast.remote(10) for p in peers]))
    ray.shutdown()

    sync_s = mean("time/sync_s")
    table = [
        ("machine", f"{platform.machine()} {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}"),
        ("date", time.strftime("%Y-%m-%d")),
        ("policy params", f"{n_params / 1e6:.2f} M ({sync_bytes / 2**20:.1f} MiB fp32)"),
        ("step time (s)", f"{mean('time/step_s'):.2f}"),
        ("generation (s) / tokens/s", f"{mean('time/generate_s'):.2f} / {mean('perf/gen_tokens_per_s'):.0f}"),
        ("train (s) / tokens/s", f"{mean('time/train_s'):.2f} / {mean('perf/train_tokens_per_s'):.0f}"),
        ("steps in the means", f"{args.warmup + 1}-{args.steps}"),
        ("weight sync (s) / MiB/s", f"{sync_s:.4f} / {sync_bytes / 2**20 / sync_s:.0f}"),
        ("raw gloo broadcast (s) / MiB/s", f"{raw_s:.4f} / {sync_bytes / 2**20 / raw_s:.0f}"),
        ("sync overhead vs raw", f"{sync_s / raw_s:.2f}x"),
    ]
    width = max(len(k) for k, _ in table)
    print("\n| metric | value |\n|---|---|")
    for k, v in table:
        print(f"| {k:<{width}} | {v} |")


if __name__ == "__main__":
    main()
