"""The plan as the table ``plan=true`` prints (and a refused submission shows)."""

from __future__ import annotations

from r1.plan.gpus import GIB
from r1.plan.planner import USED_TERMS, Plan, PoolPlan

LABELS = {"weights": "weights", "gradients": "gradients", "optimizer": "optimizer state (sharded)",
          "reference": "reference policy", "activations": "activations", "logprob_buffers": "log-prob buffers",
          "non_torch": "outside torch (NCCL, graphs)", "kv_cache": "KV cache", "reserved": "reserved (context, "
          "fragmentation)"}


OVERLAP = {True: "generation overlaps training: algo.max_staleness >= 1",
           False: "on-policy: the phases run one after the other"}


def size(n: float) -> str:
    """Bytes as GiB, or MiB below one GiB (the tiny CPU model's terms)."""
    return f"{n / GIB:9.2f} GiB" if n >= GIB or n == 0 else f"{n / 2**20:9.2f} MiB"


def _pool(pool: PoolPlan) -> list[str]:
    where = f"{pool.gpus} GPU{'s' if pool.gpus > 1 else ''}" if pool.gpus else "CPU workers"
    state = "" if not pool.gpus else ("  fits" if pool.fits else "  DOES NOT FIT")
    lines = [f"{pool.name} pool: {where}, {pool.layout}{state}"]
    for key in USED_TERMS:
        if key in pool.terms and (pool.terms[key] or key in ("weights", "activations")):
            label = LABELS[key] + (" (profiled pass)" if key == "activations" and "kv_blocks" in pool.terms else "")
            lines.append(f"  {label:<34}{size(pool.terms[key])}")
    if pool.capacity:
        lines.append(f"  {'per GPU':<34}{size(pool.used)} of {pool.capacity / GIB:.1f} ({pool.used / pool.capacity:.0%})")
    if pool.problem:
        lines.append(f"  problem: {pool.problem}")
    if pool.fix:
        lines.append(f"  fits with: {' '.join(pool.fix)}")
    lines += [f"  {note}" for note in pool.notes]
    return lines


def render(plan: Plan) -> str:
    s = plan.shape
    gpu = (f"  GPU {plan.gpu.name}: {plan.gpu.memory_bytes / GIB:.1f} GiB, {plan.gpu.bf16_flops / 1e12:.0f} "
           f"TFLOP/s bf16, {plan.gpu.hbm_bytes_s / 1e12:.2f} TB/s ({plan.gpu_source}; {plan.gpu.sheet})")
    lines = [f"r1 plan: {s.name}, {s.params() / 1e9:.2f}B parameters (shape: {plan.shape_source})", gpu,
             f"  responses up to {plan.longest_response} tokens after prompts of up to {plan.prompt_tokens}", ""]
    for pool in plan.pools:
        lines += _pool(pool) + [""]
    lines.pop()
    t = plan.timing
    if t:
        payload = s.params() * 2
        bound = "the longest response bounds it" if t["tail_bound"] else "throughput-bound"
        step = (f"step time (estimate, docs/plan.md): generation {t['generation_s']:.0f} s ({t['in_flight']:.0f} "
                f"sequences in flight per engine, {t['decode_tokens_s']:.0f} tokens/s, {bound}), training "
                f"{t['training_s']:.0f} s, sync {t['sync_s']:.1f} s")
        lines += ["", f"weight sync: {payload / 1e9:.1f} GB per push, ~{t['sync_s']:.1f} s", step,
                  f"  -> {t['step_s']:.0f} s a step ({OVERLAP[bool(t['overlapped'])]})"]
        gen, busy = t["generation_s"], t["training_s"] + t["sync_s"]
        waiting, idle = ("training", gen - busy) if gen > busy else ("rollout", busy - gen)
        lines.append(f"  the {waiting} pool waits {idle:.0f} s a step for the other")
    if plan.splits:
        lines += ["", "split of the job's nodes (cluster.*.train_nodes / rollout_nodes):",
                  f"  {'train':>5} {'rollout':>7}  {'training layout':<44}{'gen s':>8}{'train s':>9}{'step s':>8}"]
        for row in plan.splits:
            if not row["fits"]:
                lines.append(f"  {row['train_nodes']:>5} {row['rollout_nodes']:>7}  training pool does not fit")
                continue
            lines.append(f"  {row['train_nodes']:>5} {row['rollout_nodes']:>7}  {row['layout']:<44}"
                         f"{row['generation_s']:8.0f}{row['training_s']:9.0f}{row['step_s']:8.0f}")
        best = min((r for r in plan.splits if r["fits"]), key=lambda r: r["step_s"], default=None)
        if best:
            lines.append(f"  balanced: {best['train_nodes']} training / {best['rollout_nodes']} rollout node(s), "
                         f"~{best['step_s']:.0f} s a step")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
