"""Benchmark: the default experiment's held-out pass@1 by training step, one curve per ``algo=`` choice, same seeds.

    .venv/bin/python benchmarks/algorithms.py run --algos grpo gspo cispo rloo --seeds 0 1
    .venv/bin/python benchmarks/algorithms.py run --algos grpo gspo cispo --tag mb4 algo.minibatches_per_step=4
    .venv/bin/python benchmarks/algorithms.py plot [--png benchmarks/algorithms.png]

``run``: each (algorithm, seed) is the default experiment (``benchmarks/learning_curve.py``, its own process: a fresh
Ray) with ``algo=<name> seed=<seed>``, evaluated every ``--every`` steps; one ``benchmarks/curves/algo_<name>_s<seed>.json``
each (``--tag``: ``algo_<name>-<tag>_s<seed>``, with the overrides given after the options). Everything else is the default experiment's (group 8 x 16 prompts, lr 1e-4, 60 steps), so the algorithms
differ only in what their ``conf/algo`` file sets. ``plot``: pass@1 against the step (each seed thin, the mean thick)
and a table of the final and best pass@1 per algorithm.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CURVES = REPO / "benchmarks" / "curves"


def run(args) -> None:
    CURVES.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for algo in args.algos:
            name = f"{algo}-{args.tag}" if args.tag else algo
            print(f"== {name}, seed {seed}", flush=True)
            subprocess.run([sys.executable, str(REPO / "benchmarks" / "learning_curve.py"), "--label",
                            f"algo_{name}_s{seed}", "--every", str(args.every), f"algo={algo}", f"seed={seed}",
                            *args.overrides],
                           check=True, stdout=subprocess.DEVNULL, cwd=CURVES)  # (writes <label>.json here)


def _runs() -> dict[str, list[dict]]:
    by_algo: dict[str, list[dict]] = {}
    for path in sorted(CURVES.glob("algo_*_s*.json")):
        algo = path.stem[len("algo_"):].rsplit("_s", 1)[0]
        by_algo.setdefault(algo, []).append(json.loads(path.read_text()))
    return by_algo


def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_algo = _runs()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    print(f"{'algo':14} {'seeds':>5} {'pass@1 step 0':>14} {'final':>16} {'best':>6} {'wall min':>9}")
    colors = {}
    for algo, runs in by_algo.items():
        color = colors.setdefault(algo.split("-")[0], plt.cm.tab10.colors[len(colors)])
        ax = axes[1 if "-" in algo else 0]
        steps = [p["step"] for p in runs[0]["points"]]
        for r in runs:
            ax.plot([p["step"] for p in r["points"]], [p["pass1"] for p in r["points"]], color=color, alpha=0.3,
                    lw=1)
        mean = [statistics.mean(r["points"][i]["pass1"] for r in runs) for i in range(len(steps))]
        ax.plot(steps, mean, color=color, lw=2.5, marker="o", label=f"{algo} (mean of {len(runs)})")
        finals = [r["points"][-1]["pass1"] for r in runs]
        print(f"{algo:14} {len(runs):>5} {mean[0]:>14.3f} {statistics.mean(finals):>6.3f} "
              f"({', '.join(f'{f:.3f}' for f in finals)}) {max(mean):>6.3f} "
              f"{statistics.mean(r['wall_s'] for r in runs) / 60:>9.1f}")
    for ax, title in zip(axes, ("default experiment (one update per batch)", "the same, 4 minibatches per batch")):
        ax.set_xlabel("training step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    axes[0].set_ylabel("held-out pass@1 (thin: each seed)")
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"plot: {args.png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--algos", nargs="+", default=["grpo", "gspo", "cispo", "rloo"])
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    r.add_argument("--every", type=int, default=10)
    r.add_argument("--tag", default="", help="names these runs apart from the defaults' (with the overrides)")
    r.add_argument("overrides", nargs="*", help="hydra overrides for every run")
    p = sub.add_parser("plot")
    p.add_argument("--png", default=str(REPO / "benchmarks" / "algorithms.png"))
    args = ap.parse_args()
    run(args) if args.cmd == "run" else plot(args)


if __name__ == "__main__":
    main()
