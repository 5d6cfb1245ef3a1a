"""``stage=eval`` (``+experiment=eval``): benchmarks through the rollout pool, for one checkpoint or several.

For each model of ``eval.checkpoints`` (none: the run's model) a rollout pool is started on it and every benchmark
of ``eval.benchmarks`` (none: the data's held-out set) is sampled ``eval.k`` times per problem at
``eval.temperature`` / ``eval.top_p``: pass@1 averaged over the k samples, cons@k (majority vote), format rate,
language consistency, response length. Written to ``<run_dir>/eval/``:

    <label>/<benchmark>.jsonl   per problem: prompt, reference, metrics, every sample's answer and correctness
    summary.json                label -> benchmark -> metrics
    summary.md                  the comparison table (also printed)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from r1.data.prompts import load_prompts
from r1.eval.held_out import evaluate_problems, summarize
from r1.inputs import check_sandbox, check_vllm_can_serve, prepare_data, prepare_model
from r1.run_context import RunContext
from r1.workers.lifecycle import WorkerLifecycle
from r1.workers.pools import RolloutPool

log = logging.getLogger(__name__)


def labels(models: list[str]) -> list[str]:
    """Short unique names: the fewest trailing path parts that tell the models apart (``policy`` left out)."""
    parts = [[p for p in Path(m).parts if p != "policy"] for m in models]
    for n in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{i}:{m}" for i, m in enumerate(models)]


def benchmark_sets(cfg) -> list[tuple[str, list]]:
    fields = {"prompt_field": cfg.data.prompt_field, "answer_field": cfg.data.answer_field,
              "tests_field": cfg.data.tests_field}
    if not cfg.eval.benchmarks:
        return [("held_out", prepare_data(cfg)[1].problems)]
    sets = [(b.name, load_prompts(b.path, **fields).problems) for b in cfg.eval.benchmarks]
    if any(p.tests for _, problems in sets for p in problems):
        check_sandbox()
    return sets


def run(cfg) -> dict:
    with RunContext(cfg) as ctx:  # inputs checked, run_dir and config.yaml; Ray closed at the end
        out_dir = ctx.run_dir / "eval"
        out_dir.mkdir(parents=True, exist_ok=True)
        models = list(cfg.eval.checkpoints) or [prepare_model(cfg)]
        if cfg.rollout.engine == "vllm":
            for model in cfg.eval.checkpoints:
                check_vllm_can_serve(cfg, model)
        sets = benchmark_sets(cfg)
        summary: dict[str, dict[str, dict]] = {}
        names = list(cfg.eval.labels) if cfg.eval.labels else labels(models)
        templates = list(cfg.eval.templates) or [cfg.data.template] * len(models)
        if not len(names) == len(templates) == len(models):
            raise ValueError(f"eval.labels ({len(names)}) and eval.templates ({len(templates)}) need one entry per "
                             f"checkpoint ({len(models)})")
        ctx.connect()
        for label, model, template in zip(names, models, templates, strict=True):
            rollout = RolloutPool(with_template(cfg, template), model)
            try:  # (one checkpoint's pool at a time: it is shut down before the next one starts)
                for name, problems in sets:
                    rows = evaluate_problems(cfg, WorkerLifecycle(rollout), problems, step=0, version=0)
                    write_rows(out_dir / label / f"{name}.jsonl", problems, rows)
                    summary.setdefault(label, {})[name] = summarize(rows, cfg.eval.k) | {"model": model}
            finally:
                rollout.shutdown()
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    table = comparison_table(summary, cfg.eval.k)
    (out_dir / "summary.md").write_text(table)
    print_table(summary, cfg.eval.k)
    return {"run_dir": str(cfg.run_dir), "summary": summary, "stopped_by": None, "aborted": None}


def with_template(cfg, template: str):
    """``cfg`` with ``data.template`` set: how this checkpoint is prompted (a distilled student speaks its chat)."""
    out = OmegaConf.create(OmegaConf.to_container(cfg))
    out.data.template = template
    return out


def write_rows(path: Path, problems, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for problem, row in zip(problems, rows):  # (rows: the first eval.max_problems problems)
            reference = {"tests": len(problem.tests)} if problem.tests else {"answer": problem.answer}
            f.write(json.dumps({"prompt": problem.prompt, **reference, **row}) + "\n")


COLUMNS = ("pass@1", "cons@{k}", "format_rate", "language", "response_length")


def _cells(metrics: dict, k: int) -> list[str]:
    out = []
    for key in (c.format(k=k) for c in COLUMNS):
        value = metrics[key]
        out.append(f"{value:.1f}" if key == "response_length" else f"{100 * value:.1f}")
    return out


def comparison_table(summary: dict, k: int) -> str:
    """Markdown: a row per (checkpoint, benchmark); rates in %, length in tokens."""
    header = ["checkpoint", "benchmark", "problems", *(c.format(k=k) for c in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, benches in summary.items():
        for name, m in benches.items():
            lines.append("| " + " | ".join([label, name, str(int(m["problems"])), *_cells(m, k)]) + " |")
    return "\n".join(lines) + "\n"


def print_table(summary: dict, k: int) -> None:
    table = Table(title="Evaluation (rates in %, length in tokens)")
    for column in ("checkpoint", "benchmark", "problems", *(c.format(k=k) for c in COLUMNS)):
        table.add_column(column, justify="left" if column in ("checkpoint", "benchmark") else "right")
    for label, benches in summary.items():
        for name, m in benches.items():
            table.add_row(label, name, str(int(m["problems"])), *_cells(m, k))
    Console(highlight=False, width=160).print(table)
