"""Held-out evaluation through the rollout pool: pass@1 over k samples (T=0.6, top-p 0.95) and cons@k."""

from __future__ import annotations

from rich.table import Table

from r1.types import SamplingParams


def evaluate(cfg, workers, eval_set, step: int, version: int) -> dict[str, float]:
    """The held-out metrics of policy ``version`` (at driver step ``step``, which seeds the sampling)."""
    return summarize(evaluate_problems(cfg, workers, eval_set.problems, step, version), cfg.eval.k)


def evaluate_problems(cfg, workers, problems, step: int, version: int) -> list[dict]:
    """Through ``workers`` (``r1.workers.lifecycle.WorkerLifecycle``), per problem (the first ``eval.max_problems``): pass@1 over ``eval.k`` samples, cons@k, format, language
    consistency, length, and each sample's answer and correctness."""
    problems = problems[: cfg.eval.max_problems] if cfg.eval.max_problems else problems
    params = SamplingParams(
        n=cfg.eval.k, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
        max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.seed * 7919 + step,
    )
    return workers.evaluate([(i, p.prompt, p.reference) for i, p in enumerate(problems)], params, version)


def summarize(rows: list[dict], k: int) -> dict[str, float]:
    """Means over the problems that were evaluated; ``skipped``: those that could not be (a prompt beyond the
    engine's context, a reward that raised, work lost twice), left out of every mean."""
    done = [r for r in rows if "skipped" not in r]
    n = len(done)

    def mean(key: str) -> float:
        return sum(r[key] for r in done) / n if n else float("nan")

    return {"pass@1": mean("pass1"), f"cons@{k}": mean("cons"), "format_rate": mean("format"),
            "language": mean("language"), "response_length": mean("length"), "problems": float(n),
            "skipped": float(len(rows) - n)}


def provenance(cfg, model_path: str) -> str:
    """What produced a result, for the line under the final table: the run's seed, the base model (for a tiny
    model: its pretraining seed and where selection kept it) and, when the trainer computes on CPU, the ATen
    kernels in use -- the same seed gives other floats with AVX-512 than with AVX2, so a CPU result names both."""
    import json
    import os
    from pathlib import Path

    import torch

    parts = [f"seed {cfg.seed}"]
    info = Path(model_path) / "pretrain.json"
    if cfg.model.source == "tiny" and info.is_file():
        selection = json.loads(info.read_text()).get("selection")
        base = f"tiny base model: pretraining seed {cfg.model.tiny.seed}"
        if selection:
            kept = selection["kept"]
            base += f", kept at step {kept['step']} (check pass@1 {100 * kept['pass@1']:.1f}%)"
        parts.append(base)
    else:
        parts.append(f"base model {model_path}")
    if not cfg.trainer.gpus_per_worker:
        parts.append(f"CPU kernels {torch.backends.cpu.get_cpu_capability()} "
                     f"(ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY') or 'unset'})")
    return "; ".join(parts)


def print_comparison(base: dict, final: dict, console, caption: str | None = None) -> None:
    table = Table(title=f"Held-out evaluation ({int(final['problems'])} problems)")
    table.add_column("metric")
    table.add_column("base model", justify="right")
    table.add_column("trained policy", justify="right")
    table.add_column("change", justify="right")
    for key, before in base.items():
        if key == "problems":
            continue
        scale = 1.0 if key == "response_length" else 100.0
        unit = "" if key == "response_length" else " pts"
        table.add_row(key, f"{before * scale:.1f}", f"{final[key] * scale:.1f}",
                      f"{(final[key] - before) * scale:+.1f}{unit}")
    console.print(table)
    if caption:
        console.print(f"produced by: {caption}", style="dim", soft_wrap=True, markup=False, highlight=False)
