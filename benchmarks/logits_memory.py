"""Benchmark: peak memory of per-token log-probs (forward + backward) against sequence length, whole vs chunked.

    .venv/bin/python benchmarks/logits_memory.py [--lengths 1024,2048,4096,8192,16384] [--vocab 32768]
                                                 [--hidden 256] [--chunk 1024]

Each point runs in a fresh process (one gloo rank, TP=1) and reports its peak resident memory above the process's
baseline (inputs allocated, nothing computed): ``r1.engines.megatron.logprobs.vocab_parallel_logprobs`` with one
chunk (the [tokens x vocab] logits alive at once, and kept for backward) and with ``--chunk`` tokens per chunk
(recomputed in backward). Chunked memory should stay flat in sequence length beyond the inputs themselves.
Prints a table; copy it, with machine and date, into benchmarks/RESULTS.md. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_point(tokens: int, vocab: int, hidden: int, chunk: int) -> dict:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    from r1.engines.megatron import cpu_compat
    from r1.engines.megatron.layout import ParallelLayout, initialize
    from r1.engines.megatron.logprobs import vocab_parallel_logprobs

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PORT", "29611"))
    dist.init_process_group("gloo", rank=0, world_size=1)
    cpu_compat.apply()
    initialize(ParallelLayout(), 1, seed=0)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).requires_grad_(True)
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    baseline = _rss_mib()
    start = time.perf_counter()
    logp, _ = vocab_parallel_logprobs(h, w, targets, vocab_size=vocab, chunk_tokens=chunk, with_entropy=True)
    logp.sum().backward()
    seconds = time.perf_counter() - start
    dist.destroy_process_group()
    return {"peak_mib": _rss_mib() - baseline, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--point", help=argparse.SUPPRESS)  # internal: tokens,vocab,hidden,chunk in this process
    args = ap.parse_args()
    if args.point:
        print(json.dumps(one_point(*map(int, args.point.split(",")))))
        return

    lengths = [int(x) for x in args.lengths.split(",")]
    logits_mib = {n: n * args.vocab * 4 / 2**20 for n in lengths}
    print(f"\n{platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}, vocab {args.vocab}, "
          f"hidden {args.hidden}, fp32, TP=1; peak RSS above the inputs, forward + backward\n")
    print(f"| tokens | fp32 logits (MiB) | whole: peak (MiB) | whole (s) | chunks of {args.chunk}: peak (MiB) | "
          "chunked (s) |\n|---|---|---|---|---|---|")
    for i, n in enumerate(lengths):
        row = []
        for chunk in (0, args.chunk):
            out = subprocess.run([sys.executable, __file__, "--point", f"{n},{args.vocab},{args.hidden},{chunk}"],
                                 capture_output=True, text=True, check=True,
                                 env={**os.environ, "PORT": str(29611 + 2 * i + (chunk > 0))})
            row.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"| {n} | {logits_mib[n]:.0f} | {row[0]['peak_mib']:.0f} | {row[0]['seconds']:.2f} | "
              f"{row[1]['peak_mib']:.0f} | {row[1]['seconds']:.2f} |")


if __name__ == "__main__":
    main()
