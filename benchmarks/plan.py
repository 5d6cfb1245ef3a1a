"""Benchmark: the planner's step-time model (r1/plan/timing.py) against measured phases on this CPU.

    .venv/bin/python benchmarks/plan.py [--threads 2] [--sequences 16] [--max-tokens 256]

This machine becomes a "GPU kind" of its own: its peak is a measured fp32 matmul's FLOP/s, its "HBM" a measured
large copy's bytes/s. A randomly initialised Qwen2 of ~26M parameters (hidden 512, 8 layers: big enough that
weights, not Python, dominate a decode step) then generates with the real vLLM CPU engine and trains one GRPO step
on the real HF engine (the old policy's log-probs, the reference's, forward and backward). The planner predicts
each phase from the same shape and sizes, at its default assumptions (decode at 60% of the bandwidth, training at
35% of the peak); the table shows both and the efficiency the CPU really reached. Prints a table; not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def matmul_flops(threads: int, n: int = 1536, reps: int = 8) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def copy_bandwidth(threads: int, mib: int = 512, reps: int = 5) -> float:
    torch.set_num_threads(threads)
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    return 2 * src.numel() * 4 * reps / (time.perf_counter() - start)  # read + write


async def main() -> None:
    from benchmarks.generation import random_model, vllm_engine
    from launcher.main import compose
    from r1.algo import GRPOLoss
    from r1.config.schema import PlannerConfig
    from r1.data.template import apply_template
    from r1.data.tokens import TokenRules
    from r1.engines.hf_train import HFTrainEngine
    from r1.inputs import prepare_data, prepare_model
    from r1.plan.gpus import GPUKind
    from r1.plan.shape import from_hf_config
    from r1.plan.timing import Assumptions, decode_step_s, generation_s, training_s
    from r1.types import SamplingParams, TrainBatch

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256)
    args = ap.parse_args()
    flops, bandwidth = matmul_flops(args.threads), copy_bandwidth(args.threads)
    cpu = GPUKind("this_cpu", 0, flops, bandwidth, bandwidth, "measured: fp32 matmul, 512 MiB copy")

    cfg = compose(["run_dir=unused", "logger=none"])
    tokenizer_from = prepare_model(cfg)
    train, _ = prepare_data(cfg)
    tokens = TokenRules.load(tokenizer_from)
    prompt = tokens.encode(apply_template(train.problems[0].prompt))
    path = random_model(Path(tempfile.mkdtemp(prefix="r1-planbench-")) / "m", hidden=512, layers=8, heads=8,
                        inter=1408, vocab_from=tokenizer_from)
    import json

    shape = from_hf_config(json.loads((Path(path) / "config.json").read_text()), "qwen2-26m")

    # generation: one engine, all sequences at once (one prompt, n samples)
    engine = vllm_engine(path, args.threads)
    params = SamplingParams(n=args.sequences, temperature=1.0, top_p=1.0, max_new_tokens=args.max_tokens, seed=0)
    try:
        await engine.generate([prompt], SamplingParams(n=2, max_new_tokens=8, seed=1))  # warm-up
        start = time.perf_counter()
        out = await engine.generate([prompt], params)
        gen_measured = time.perf_counter() - start
    finally:
        engine.shutdown()
    lengths = [len(c.token_ids) for c in out]
    mean_share = sum(lengths) / len(lengths) / args.max_tokens
    defaults = PlannerConfig()
    a = Assumptions(prompt_tokens=len(prompt), mean_response_share=mean_share, train_mfu=defaults.train_mfu,
                    decode_bandwidth_share=defaults.decode_bandwidth_share, network_gbps=defaults.network_gbps,
                    dtype_bytes=4)
    gen = generation_s(shape, cpu, a, sequences=args.sequences, engines=1, tp=1, max_tokens=args.max_tokens,
                       concurrency=args.sequences)
    one_step = decode_step_s(shape, cpu, tp=1, sequences=args.sequences, context=len(prompt) + args.max_tokens / 4,
                             bandwidth_share=1.0, dtype_bytes=4)

    # training: the sampled lengths, the HF engine's GRPO step (pi_old, the reference, forward + backward)
    torch.set_num_threads(args.threads)
    width = len(prompt) + max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention, response = torch.zeros_like(ids), torch.zeros(len(lengths), width)
    for row, n in enumerate(lengths):
        ids[row, : len(prompt) + n] = torch.randint(1, shape.vocab - 1, (len(prompt) + n,))
        attention[row, : len(prompt) + n] = 1
        response[row, len(prompt): len(prompt) + n] = 1
    batch = TrainBatch(ids, attention, response, torch.randn(len(lengths)))
    trainer = HFTrainEngine(path, lr=1e-5, betas=(0.9, 0.99), weight_decay=0.0, warmup_steps=0, grad_clip=1.0,
                            micro_batch_size=len(lengths), with_reference=True)
    loss = GRPOLoss(clip_low=0.2, clip_high=0.2, agg="seq_mean_token_mean", kl_coef=0.001, kl_kind="k3",
                    kl_in_loss=True)
    trainer.train_step(batch, loss)  # warm-up
    start = time.perf_counter()
    batch.old_logprobs = trainer.compute_logprobs(batch, temperature=1.0)
    trainer.train_step(batch, loss)  # (the reference's forward inside)
    train_measured = time.perf_counter() - start
    train_predicted = training_s(shape, cpu, a, sequences=len(lengths), max_tokens=args.max_tokens, gpus=1,
                                 recompute_full=False, reference=True)

    print(f"\nmachine: {platform.machine()} {platform.processor() or ''}, {args.threads} threads; measured peak "
          f"{flops / 1e9:.0f} GFLOP/s fp32 matmul, {bandwidth / 1e9:.1f} GB/s copy; date {time.strftime('%Y-%m-%d')}")
    print(f"model {shape.params() / 1e6:.1f}M parameters (fp32); {args.sequences} sequences, prompt {len(prompt)} "
          f"tokens, responses up to {args.max_tokens} (mean {sum(lengths) / len(lengths):.0f})\n")
    print("| phase | predicted s (planner defaults) | measured s | reached |")
    print("|---|---|---|---|")
    print(f"| generation (vLLM CPU, decode at 60% of bandwidth) | {gen['generation_s']:.2f} | {gen_measured:.2f} | "
          f"{one_step * sum(lengths) / args.sequences / gen_measured:.0%} of the bandwidth |")
    print(f"| training (HF, pi_old + reference + fwd/bwd at 35% MFU) | {train_predicted:.2f} | {train_measured:.2f} | "
          f"{train_predicted * a.train_mfu / train_measured:.0%} MFU |")


if __name__ == "__main__":
    asyncio.run(main())
