"""Benchmark: r1's GRPO step against the floor, the same step as a plain single-process loop.

    .venv/bin/python benchmarks/overhead.py [--steps 8] [--warmup 2] [--rounds 1] [--staleness 0] [--own-cores]
                                            [--workloads tiny_step,default,...] [hydra overrides ...]

The floor does exactly the work of one GRPO step and nothing else: the HF rollout engine's generation call on the
training model itself (no second copy, no weight sync), the same reward, ``r1.algo`` advantages and loss, the
reference forward when KL is on, one training forward, backward, the same AdamW step -- with the trainer's own
arithmetic (``r1.engines.hf_train``: logits only where they predict response tokens, one log-softmax), so that the
ratio measures what r1's structure costs, not a difference in kernels. No Ray,
no pools, no processes. r1 runs its real driver (``r1.driver.run``) on the same config. Both use every core of the
machine: the floor with ``trainer.torch_threads`` threads, r1 with its pools' threads.

``--own-cores``: the pools get cores of their own (1 rollout worker with 1 thread, a trainer with 1 thread); the
floor's generation and training are timed with 1 thread each, and an asynchronous r1 step (``--staleness 1``) is
compared with max(generation, training) of the floor.

Prints a table (step time, tokens/s, r1 / floor, r1's step broken down); copy it, with machine and date, into
benchmarks/RESULTS.md. Not a test: no thresholds.
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

import torch

REPO = Path(__file__).resolve().parent.parent

RANDOM_256 = ["model.tiny.hidden_size=256", "model.tiny.intermediate_size=768", "model.tiny.pretrain_steps=0",
              "model.tiny.select_band=null"]
WORKLOADS = {
    # 16 prompts x 8 samples, responses of <= 4 tokens, no KL: where fixed per-step costs show
    "tiny_step": ["rollout.length_schedule=[{from_step:0,max_tokens:4}]", "algo.kl_coef=0"],
    "default": [],  # the embedded default experiment (16 x 8, <= 64 tokens, KL 0.001)
    "random_4x8x64": [*RANDOM_256, "algo.prompts_per_step=4", "rollout.length_schedule=[{from_step:0,max_tokens:64}]"],
    "random_8x8x128": [*RANDOM_256, "algo.prompts_per_step=8",
                       "rollout.length_schedule=[{from_step:0,max_tokens:128}]"],
}
# Both sides do the same work every step: at lr 0 the policy stays the base model, so r1 and the floor (which draw
# different samples) keep the same response-length distribution; every pass and the optimizer step still run.
SAME_WORK = ["trainer.lr=0"]
OWN_CORES = ["rollout.num_workers=1", "rollout.torch_threads=1", "trainer.torch_threads=1"]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def floor_steps(cfg, model_path: str, train_set, steps: int, gen_threads: int, train_threads: int) -> list[dict]:
    """The GRPO step as a plain loop in this process; per-step timings."""
    from transformers import AutoModelForCausalLM

    from r1.algo import group_advantages
    from r1.data.prompts import PromptSampler
    from r1.data.template import apply_template
    from r1.data.tokens import TokenRules
    from r1.driver import make_loss, max_tokens_at, sampling_params
    from r1.engines.hf_rollout import HFRolloutEngine
    from r1.engines.hf_train import response_logprobs
    from r1.rewards import build_reward
    from r1.types import Group, Sample, collate

    torch.manual_seed(cfg.trainer.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.config.use_cache = False
    kl = cfg.algo.kl_coef > 0 and cfg.algo.kl_placement != "none"
    reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval() if kl else None
    t = cfg.trainer
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.adam_betas),
                                  weight_decay=t.weight_decay, eps=1e-8)
    engine = HFRolloutEngine(model_path, generate_batch_size=cfg.rollout.generate_batch_size)
    engine.model, engine._params = model, dict(model.named_parameters())  # generate with the policy itself
    reward = build_reward([(x.name, x.weight) for x in cfg.reward.terms], verify_workers=cfg.reward.verify_workers,
                          verify_timeout_s=cfg.reward.verify_timeout_s)
    reward.verifier.warm_up()
    tokens = TokenRules.load(model_path)
    sampler = PromptSampler(len(train_set.problems), cfg.seed)
    G, P = cfg.algo.group_size, cfg.algo.prompts_per_step
    rows = []
    for step in range(steps):
        row: dict[str, float] = {}
        start = time.perf_counter()
        problems = [train_set.problems[i] for i in sampler.next_indices(P)]
        prompt_ids = [tokens.encode(apply_template(p.prompt, cfg.data.template)) for p in problems]
        torch.set_num_threads(gen_threads)
        model.eval()
        completions, row["generate"] = timed(engine._generate, prompt_ids, sampling_params(cfg, step, step))
        texts = tokens.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        scored, row["reward"] = timed(reward.score, texts, [p.answer for p in problems for _ in range(G)])
        torch.set_num_threads(train_threads)
        model.train()
        t0 = time.perf_counter()
        groups = [Group(i, p.answer, [
            Sample(prompt_ids[i], c.token_ids, c.rollout_logprobs, "", scored.total[i * G + j], {}, None,
                   c.finish_reason, step) for j, c in enumerate(completions[i * G:(i + 1) * G])])
            for i, p in enumerate(problems)]
        batch = collate(groups, group_advantages(torch.tensor(scored.total), G), tokens.pad_id)
        row["collate"] = time.perf_counter() - t0
        loss_fn = make_loss(cfg, max_tokens_at(cfg, step))
        t0 = time.perf_counter()
        if kl:
            with torch.no_grad():
                batch.ref_logprobs, _ = response_logprobs(reference, batch, loss_fn.temperature)
        row["ref_forward"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        logp, entropy = response_logprobs(model, batch, loss_fn.temperature, with_entropy=True)
        loss, _ = loss_fn(logp, batch, entropy)
        row["forward"] = time.perf_counter() - t0
        _, row["backward"] = timed(loss.backward)
        t0 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row["optimizer"] = time.perf_counter() - t0
        row["step"] = time.perf_counter() - start
        row["gen_tokens"] = sum(len(c.token_ids) for c in completions)
        row["train_tokens"] = int(batch.attention_mask.sum())
        rows.append(row)
    reward.verifier.close()
    return rows


def r1_steps(cfg) -> list[dict]:
    """r1's own driver on ``cfg``; the per-step metrics it logged, with the step period and the derived parts."""
    import ray

    from r1.driver import run

    ray.init(address="local", num_cpus=cfg.cluster.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        run(cfg)
    finally:
        ray.shutdown()
    rows = [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/step_s" in r]
    for prev, r in zip([None, *steps], steps):
        # the step period: wall time between consecutive step logs (everything the loop does, logging included)
        r["step"] = r["time"] - prev["time"] if prev else r["time/step_s"]
        r["driver"] = r["step"] - r["time/wait_for_rollouts_s"] - r["time/train_s"] - r["time/sync_s"]
        r["batch"] = r["time/train_s"] - sum(r[f"time/trainer_{k}_s"] for k in ("forward", "backward", "optimizer", "ray"))
    return steps


def mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else float("nan")


PARTS = [  # (label, floor key(s), r1 key): r1's step broken down, next to the floor's
    ("wait for rollouts", None, "time/wait_for_rollouts_s"),
    ("  generation (workers)", "generate", "time/generate_s"),
    ("  reward (workers)", "reward", "time/reward_s"),
    ("train (driver clock)", None, "time/train_s"),
    ("  batch, advantages, loss (driver)", "collate", "batch"),
    ("  forward passes (trainer)", ("ref_forward", "forward"), "time/trainer_forward_s"),
    ("  backward (trainer)", "backward", "time/trainer_backward_s"),
    ("  optimizer (trainer)", "optimizer", "time/trainer_optimizer_s"),
    ("  Ray round trips", None, "time/trainer_ray_s"),
    ("weight sync + refill", None, "time/sync_s"),
    ("driver bookkeeping (logs, ledger, metrics)", None, "driver"),
    ("step", "step", "step"),
]


def main() -> None:
    sys.path.insert(0, str(REPO))
    from launcher.main import compose
    from r1.inputs import prepare_data, prepare_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="leading steps left out of the means")
    ap.add_argument("--rounds", type=int, default=1, help="floor, r1, floor, r1, ...: this machine's speed drifts")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--staleness", type=int, default=0, help="r1's algo.max_staleness")
    ap.add_argument("--own-cores", action="store_true", help="1 core per pool (see the module docstring)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. cache_dir=/path")
    args = ap.parse_args()

    names = args.workloads.split(",")
    floor: dict[str, list[list[dict]]] = {n: [] for n in names}
    r1: dict[str, list[list[dict]]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:
            run_dir = Path(tempfile.mkdtemp(prefix=f"r1-overhead-{name}-"))
            cfg = compose([
                f"run_dir={run_dir}", "logger=none", f"trainer.total_steps={args.steps}", "eval.at_start=false",
                "eval.every_steps=0", "eval.max_problems=4", "checkpoint.every_steps=0",
                f"algo.max_staleness={args.staleness}", *SAME_WORK, *WORKLOADS[name], *(OWN_CORES if args.own_cores else []),
                *args.overrides])
            model_path = prepare_model(cfg)
            train_set, _ = prepare_data(cfg)
            threads = 1 if args.own_cores else cfg.trainer.torch_threads
            floor[name].append(floor_steps(cfg, model_path, train_set, args.steps, threads, threads)[args.warmup:])
            r1[name].append(r1_steps(cfg)[args.warmup:])

    print(f"\n{platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"max_staleness={args.staleness}{', own cores' if args.own_cores else ''}, {args.rounds} round(s) of "
          f"floor then r1, means over steps {args.warmup + 1}-{args.steps} of each\n")
    target = "max(gen, train)" if args.own_cores else "step"
    print(f"| workload | floor {target} (s) | r1 step (s) | r1 / floor | per round | floor gen tok/s | r1 gen tok/s |"
          "\n|---|---|---|---|---|---|---|")
    for name in names:
        def floor_time(rows):
            if not args.own_cores:
                return mean(rows, "step")
            gen = mean(rows, "generate") + mean(rows, "reward")
            return max(gen, mean(rows, "step") - gen)
        f_all, r_all = [x for rows in floor[name] for x in rows], [x for rows in r1[name] for x in rows]
        f_t, r_t = floor_time(f_all), mean(r_all, "step")
        per_round = ", ".join(f"{mean(r, 'step') / floor_time(f):.2f}" for f, r in zip(floor[name], r1[name]))
        print(f"| {name} | {f_t:.3f} | {r_t:.3f} | {r_t / f_t:.2f} | {per_round} | "
              f"{mean(f_all, 'gen_tokens') / mean(f_all, 'step'):.0f} | {mean(r_all, 'perf/gen_tokens') / r_t:.0f} |")

    print("\n| part (s) | " + " | ".join(f"{n} floor | {n} r1" for n in names) + " |")
    print("|---" * (1 + 2 * len(names)) + "|")
    for label, floor_keys, r1_key in PARTS:
        cells = []
        for name in names:
            f_all, r_all = [x for rows in floor[name] for x in rows], [x for rows in r1[name] for x in rows]
            keys = (floor_keys,) if isinstance(floor_keys, str) else floor_keys or ()
            cells += [f"{sum(mean(f_all, k) for k in keys):.3f}" if keys else "", f"{mean(r_all, r1_key):.3f}"]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
