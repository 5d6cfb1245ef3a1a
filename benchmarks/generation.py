"""Benchmark: rollout engines head to head (vLLM vs HF generate, same threads).

    .venv/bin/python benchmarks/generation.py [--threads 2]

Generation: the default experiment's shapes (16 prompts x 8 samples, up to 64 tokens, the trained-from-scratch tiny
model) and long responses (up to 512 and 2,048 tokens) from a randomly initialised model of the same shape with a
4,096-token context; a random model stops at EOS about once in |V| tokens, so the table reports the mean length.
(Weight pushes into vLLM: ``benchmarks/weight_push.py``.) Prints a table; not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def random_model(out: Path, *, hidden: int, layers: int, heads: int, inter: int, vocab_from: str) -> str:
    """A randomly initialised Qwen2 with the tokenizer of ``vocab_from`` and a 4,096-token context."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(vocab_from)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, intermediate_size=inter, max_position_embeddings=4096,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def vllm_engine(path: str, threads: int):
    from r1.engines.vllm_rollout import VLLMRolloutEngine

    return VLLMRolloutEngine(path, dtype="float32", tensor_parallel_size=1, max_model_len=None, kv_cache_mb=1024,
                             gpu_memory_utilization=0.85, max_num_seqs=256, seed=0, max_tokens=1,
                             cpu_cores=f"0-{threads - 1}")


async def time_generation(engine, prompts, params) -> tuple[float, int]:
    await engine.generate(prompts[:1], params)  # warm-up
    start = time.perf_counter()
    out = await engine.generate(prompts, params)
    return time.perf_counter() - start, sum(len(c.token_ids) for c in out)


def _raw_peer(rank, port, numel, reps, q):
    from r1.distributed.bucketed_broadcast import BroadcastGroup

    group = BroadcastGroup("127.0.0.1", port, rank, 2, backend="gloo", timeout_s=120)
    t = torch.ones(numel)
    group._broadcast(t)
    start = time.perf_counter()
    for _ in range(reps):
        group._broadcast(t)
    q.put((time.perf_counter() - start) / reps)


def two_peers(target, *args) -> float:
    """Run ``target(rank, port, *args, queue)`` as ranks 0 and 1 of a fresh group, in two spawned processes; the
    slower rank's seconds."""
    from r1.distributed.bucketed_broadcast import free_port

    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=target, args=(r, port, *args, q)) for r in range(2)]
    for p in procs:
        p.start()
    out = max(q.get() for _ in procs)
    for p in procs:
        p.join()
    return out


def raw_broadcast_s(numel: int, reps: int = 3) -> float:
    return two_peers(_raw_peer, numel, reps)


def table(title, header, rows):
    print(f"\n{title}\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


async def main() -> None:
    from launcher.main import compose
    from r1.data.template import apply_template
    from r1.data.tokens import TokenRules
    from r1.engines.hf_rollout import HFRolloutEngine
    from r1.inputs import prepare_data, prepare_model
    from r1.types import SamplingParams

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = compose(["run_dir=unused", "logger=none"])
    default_model = prepare_model(cfg)
    train, _ = prepare_data(cfg)
    tokens = TokenRules.load(default_model)
    prompts = [tokens.encode(apply_template(p.prompt)) for p in train.problems[:16]]
    tmp = Path(tempfile.mkdtemp(prefix="r1-genbench-"))
    long_model = random_model(tmp / "long", hidden=128, layers=4, heads=4, inter=384, vocab_from=default_model)

    rows = []
    for label, path, n_prompts, n, max_tokens in [
        ("default (16 x 8, <=64 tok)", default_model, 16, 8, 64),
        ("long (4 x 8, <=512 tok)", long_model, 4, 8, 512),
        ("long (2 x 8, <=2048 tok)", long_model, 2, 8, 2048),
    ]:
        params = SamplingParams(n=n, temperature=1.0, top_p=1.0, max_new_tokens=max_tokens, seed=0)
        result = {}
        for name in ("hf", "vllm"):
            engine = HFRolloutEngine(path, generate_batch_size=128) if name == "hf" else vllm_engine(path, args.threads)
            try:
                result[name] = await time_generation(engine, prompts[:n_prompts], params)
            finally:
                engine.shutdown()
        (hf_s, hf_tok), (v_s, v_tok) = result["hf"], result["vllm"]
        rows.append((label, f"{hf_tok / (n_prompts * n):.0f} / {v_tok / (n_prompts * n):.0f}",
                     f"{hf_tok / hf_s:.0f}", f"{v_tok / v_s:.0f}", f"{(v_tok / v_s) / (hf_tok / hf_s):.1f}x"))
    print(f"\nmachine: {platform.machine()}, {args.threads} threads per engine; date {time.strftime('%Y-%m-%d')}")
    table("Generation (tokens/s, one engine)", ["shape", "mean length hf / vllm", "HF generate", "vLLM",
                                                "vLLM / HF"], rows)


if __name__ == "__main__":
    asyncio.run(main())
