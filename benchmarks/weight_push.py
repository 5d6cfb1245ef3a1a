"""Benchmark: a policy push into a vLLM engine (one hop) vs a raw gloo broadcast of the same bytes, by model size.

    .venv/bin/python benchmarks/weight_push.py [--threads 2] [--sizes 14,135,500]

The push is what ``WeightSync`` does per engine: the sender (the trainer's rank 0; here this process) broadcasts the
bucketed state dict into vLLM's worker process, which stages it while the engine could go on generating ("stage"),
then the rollout worker makes it the version in force ("load": pause(keep), layerwise reload from the staged copy,
resume). The raw broadcast moves the same bytes between two bare processes, one flat tensor; "bucketed, bare" is
the same bucketed broadcast and staging between two bare processes (what the transport costs without vLLM's
processes on the same cores). "stage, colocated" is the same push through shared memory instead of a collective
(``rollout.placement=colocated``: the sender hands each bucket's handle, the vLLM worker copies it into its staging;
CUDA IPC on GPUs). Also reported: the vLLM worker's resident memory before and after staging (the staged copy lives
there, not in the rollout worker).
Median of 3 pushes after one warm-up. Prints a table; not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.generation import random_model, raw_broadcast_s, table, two_peers

BUCKET_MB = 64.0  # sync.bucket_mb's default


def _bare_peer(rank: int, port: int, shapes, reps: int, q) -> None:
    """One side of the same bucketed broadcast between two bare processes (the receiver stages into a pool)."""
    from r1.distributed.bucketed_broadcast import BroadcastGroup, manifest_of
    from r1.distributed.staged_receiver import BucketPool

    torch.set_num_threads(1)
    group = BroadcastGroup("127.0.0.1", port, rank, 2, backend="gloo", timeout_s=600)
    weights = [(f"t{i}", torch.ones(shape)) for i, shape in enumerate(shapes)]
    manifest, bucket, pool, times = manifest_of(weights), int(BUCKET_MB * 2**20), BucketPool(torch.device("cpu")), []
    for version in range(reps + 1):
        start = time.perf_counter()
        if rank == 0:
            group.send(weights, manifest, bucket, version)
        else:
            buckets = []
            _, arriving = group.receive_next(manifest, bucket,
                                             empty=lambda n, d, kept=buckets: kept.append(pool.host(n, d)) or kept[-1])
            list(arriving)
            pool.recycle(buckets)
        times.append(time.perf_counter() - start)
    q.put(sorted(times[1:])[len(times[1:]) // 2])


def bare_bucketed_s(shapes, reps: int = 3) -> float:
    return two_peers(_bare_peer, shapes, reps)


def vllm_worker_rss(own_pid: int) -> int:
    for p in psutil.Process(own_pid).children(recursive=True):
        try:  # (an earlier engine's processes may linger as zombies)
            if "VLLM::Worker" in p.name() + " ".join(p.cmdline()):
                return p.memory_info().rss
        except psutil.Error:
            continue
    raise RuntimeError("no VLLM::Worker process found")


async def push_times(path: str, threads: int, transport: str = "broadcast"
                     ) -> tuple[int, list[float], list[float], int, int]:
    from datetime import timedelta

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from r1.distributed.bucketed_broadcast import BroadcastGroup, free_port, manifest_of
    from r1.distributed.ipc_channel import IpcSender
    from r1.distributed.staged_receiver import SyncSpec
    from r1.engines.vllm_rollout import VLLMRolloutEngine
    from r1.types import SamplingParams

    engine = VLLMRolloutEngine(path, dtype="float32", tensor_parallel_size=1, max_model_len=512, kv_cache_mb=256,
                               gpu_memory_utilization=0.85, max_num_seqs=16, seed=0, max_tokens=1,
                               cpu_cores=f"0-{threads - 1}", enforce_eager=True)
    try:
        weights = [(n, p.detach()) for n, p in
                   AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).named_parameters()]
        manifest, bucket = manifest_of(weights), int(BUCKET_MB * 2**20)
        await engine.generate([[1, 2, 3]], SamplingParams(n=1, max_new_tokens=2))
        host, port = "127.0.0.1", free_port()
        joining = asyncio.ensure_future(
            engine.join_sync(SyncSpec(host, port, 2, 1, manifest, bucket, 600.0, transport, source=0)))
        if transport == "ipc":
            store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=600))
            sender = IpcSender(store, 0, [1], torch.device("cpu"), 600.0)
        else:
            sender = await asyncio.to_thread(BroadcastGroup, host, port, 0, 2, backend="gloo", timeout_s=600.0)
        await joining
        stage_s, load_s, rss = [], [], []
        for version in range(1, 5):
            rss.append(vllm_worker_rss(psutil.Process().pid))
            start = time.perf_counter()
            await asyncio.gather(asyncio.to_thread(sender.send, weights, manifest, bucket, version),
                                 engine.wait_staged(version))
            staged = time.perf_counter()
            rss.append(vllm_worker_rss(psutil.Process().pid))
            await engine.load(version)
            stage_s.append(staged - start)
            load_s.append(time.perf_counter() - staged)
        return [tuple(t.shape) for _, t in weights], stage_s[1:], load_s[1:], rss[0], rss[1]
    finally:
        engine.shutdown()


async def main() -> None:
    from launcher.main import compose
    from r1.inputs import prepare_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="14,135,500", help="model sizes, millions of parameters")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vocab_from = prepare_model(compose(["run_dir=unused", "logger=none"]))
    tmp = Path(tempfile.mkdtemp(prefix="r1-pushbench-"))
    rows = []
    for size in [float(s) for s in args.sizes.split(",")]:
        hidden = 384 if size < 50 else 1024 if size < 300 else 1536
        layers = max(1, round(size * 1e6 / (16 * hidden * hidden)))  # attention 4h^2 + MLP 3 x h x 4h
        path = random_model(tmp / f"m{size:g}", hidden=hidden, layers=layers, heads=hidden // 64, inter=4 * hidden,
                            vocab_from=vocab_from)
        shapes, stage_s, load_s, rss_before, rss_staged = await push_times(path, args.threads)
        ipc = sorted((await push_times(path, args.threads, "ipc"))[1])[1]
        n_params = sum(math.prod(s) for s in shapes)
        stage, load = sorted(stage_s)[1], sorted(load_s)[1]
        raw, bare = raw_broadcast_s(n_params), bare_bucketed_s(shapes)
        mib = n_params * 4 / 2**20
        rows.append((f"{n_params / 1e6:.1f} M", f"{mib:.0f}", f"{raw:.3f}", f"{bare:.3f} ({bare / raw:.2f}x)",
                     f"{stage:.3f} ({stage / raw:.2f}x)", f"{ipc:.3f} ({ipc / raw:.2f}x)", f"{load:.3f}",
                     f"{(stage + load) / raw:.2f}x",
                     f"{rss_before / 2**20:.0f} -> {rss_staged / 2**20:.0f}"))
    print(f"\nmachine: {platform.machine()}, {psutil.cpu_count()} cores, {args.threads} threads for the engine; "
          f"date {time.strftime('%Y-%m-%d')}")
    table(f"Push into a vLLM engine (one hop, gloo, {BUCKET_MB:.0f} MiB buckets) vs raw broadcast (median of 3)",
          ["params", "MiB fp32", "raw broadcast (s)", "bucketed, bare processes (s)", "stage into vLLM (s)",
           "stage, colocated (shared memory) (s)", "load (s)", "push / raw", "vLLM worker RSS MiB (staged)"], rows)


if __name__ == "__main__":
    asyncio.run(main())
