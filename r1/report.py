"""``stage=report``: the pipeline's report, from what its stages left in their run directories.

    <report.dir>/report.md           per stage: pass@1, cons@k, format rate, language consistency, response length
                                     (the eval stage's summary), the rejection-sampling counts, the stages' run dirs
    <report.dir>/report_stages.png   those metrics per stage, as bars
    <report.dir>/report_curves.png   training curves: SFT NLL per step, RL reward / accuracy / response length

The last stage of ``+pipeline=r1`` and ``+pipeline=r1_distill``; on its own:
``r1-launch stage=report report.dir=<pipeline dir> 'report.stages=[cold_start, reasoning_rl, ...]'``.
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS = (("pass@1", "pass@1 (%)"), ("format_rate", "format rate (%)"), ("language", "language consistency (%)"),
           ("response_length", "response length (tokens)"))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def collect(root: Path, stages: list[str]) -> dict:
    """Everything the report shows, read from the stage directories under ``root``."""
    out: dict = {"eval": {}, "curves": {}, "rejection": {}, "stages": {}}
    for name in stages:
        d = root / name
        done = json.loads((d / "stage.json").read_text()) if (d / "stage.json").is_file() else None
        out["stages"][name] = {"dir": f"{name}/", "kind": done["stage"] if done else None, "done": done is not None}
        if (d / "eval" / "summary.json").is_file():
            out["eval"] = json.loads((d / "eval" / "summary.json").read_text())
        if (d / "rejection" / "summary.json").is_file():
            out["rejection"][name] = json.loads((d / "rejection" / "summary.json").read_text())
        rows = _jsonl(d / "metrics.jsonl")
        if rows and "train/nll" in rows[-1]:
            out["curves"][name] = {"kind": "sft", "step": [r["step"] for r in rows],
                                   "nll": [r["train/nll"] for r in rows]}
        elif steps := [r for r in rows if "reward/mean" in r]:  # (rejection sampling logs no steps of its own)
            out["curves"][name] = {"kind": "grpo", "step": [r["step"] for r in steps],
                                   **{k: [r.get(k) for r in steps]
                                      for k in ("reward/mean", "reward/accuracy", "response/length_mean")}}
    return out


def markdown(data: dict, title: str) -> str:
    lines = [f"# {title}", ""]
    if data["eval"]:
        benches = sorted({b for m in data["eval"].values() for b in m})
        for bench in benches:
            first = next(m[bench] for m in data["eval"].values() if bench in m)
            k = next(key for key in first if key.startswith("cons@"))
            lines += [f"## {bench} ({int(first['problems'])} problems; {k})", "",
                      "| stage | pass@1 | " + k + " | format rate | language consistency | response length |",
                      "|---|---|---|---|---|---|"]
            for label, m in data["eval"].items():
                if bench in m:
                    e = m[bench]
                    lines.append(f"| {label} | {100 * e['pass@1']:.1f} | {100 * e[k]:.1f} | "
                                 f"{100 * e['format_rate']:.1f} | {100 * e['language']:.1f} | "
                                 f"{e['response_length']:.1f} |")
            lines.append("")
        lines += ["![metrics per stage](report_stages.png)", ""]
    if data["curves"]:
        lines += ["## Training", "", "![training curves](report_curves.png)", ""]
        for name, c in data["curves"].items():
            if c["kind"] == "sft":
                lines.append(f"- {name}: SFT, {len(c['step'])} steps, NLL per response token {c['nll'][0]:.3f} -> "
                             f"{c['nll'][-1]:.3f}")
            else:
                lines.append(f"- {name}: GRPO, {len(c['step'])} steps, reward {c['reward/mean'][0]:.3f} -> "
                             f"{c['reward/mean'][-1]:.3f}")
        lines.append("")
    for name, r in data["rejection"].items():
        reasons = ", ".join(f"{k.removeprefix('rejected/')} {v}" for k, v in sorted(r.items())
                            if k.startswith("rejected/"))
        kept = f"{r['rows']} rows kept of {r['samples']} samples for {r['prompts']} prompts"
        lines += [f"## {name}", "", f"{kept} (rejected: {reasons or 'none'})", ""]
    lines += ["## Stages", "", "| stage | kind | finished | run dir (under the pipeline's) |", "|---|---|---|---|"]
    lines += [f"| {n} | {s['kind'] or '-'} | {'yes' if s['done'] else 'no'} | `{s['dir']}` |"
              for n, s in data["stages"].items()]
    return "\n".join(lines) + "\n"


def plot(data: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if data["eval"]:
        labels = list(data["eval"])
        bench = min({b for m in data["eval"].values() for b in m})
        fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
        for ax, (key, name) in zip(axes, METRICS):
            scale = 1.0 if key == "response_length" else 100.0
            values = [data["eval"][label][bench][key] * scale if bench in data["eval"][label] else 0.0
                      for label in labels]
            ax.bar(range(len(labels)), values, color="tab:blue")
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{name}\n{bench}", fontsize=9)
        fig.tight_layout()
        written.append(out_dir / "report_stages.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    if data["curves"]:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for name, c in data["curves"].items():
            if c["kind"] == "sft":
                axes[0].plot(c["step"], c["nll"], label=name)
            else:
                axes[1].plot(c["step"], c["reward/accuracy"], label=name)
                axes[2].plot(c["step"], c["response/length_mean"], label=name)
        for ax, title in zip(axes, ("SFT: NLL per response token", "RL: accuracy reward", "RL: response length")):
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
            if ax.lines:
                ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "report_curves.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def build(root: str | Path, stages: list[str], title: str) -> Path:
    root = Path(root)
    data = collect(root, stages)
    plot(data, root)
    path = root / "report.md"
    path.write_text(markdown(data, title))
    return path


def run(cfg) -> dict:
    path = build(cfg.report.dir, list(cfg.report.stages), cfg.report.title)
    print(f"report: {path}")
    return {"run_dir": str(cfg.run_dir), "report": str(path), "stopped_by": None, "aborted": None}
