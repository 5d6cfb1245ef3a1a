"""Benchmark: learning per second -- the default experiment's held-out pass@1 against training wall-clock time.

    .venv/bin/python benchmarks/learning_curve.py --label after [--every 10] [--repo PATH] [hydra overrides ...]
    .venv/bin/python benchmarks/learning_curve.py --plot benchmarks/learning_curve.png RUN.json [RUN.json ...]

The first form runs the default experiment (``r1.driver.run``, logger off) with an evaluation every ``--every``
steps and writes ``<label>.json``: per evaluation the step, the pass@1 and the *training* seconds so far (the sum
of step periods: evaluation time is left out, so evaluating more often for a finer curve does not bend it), plus
the run's wall-clock. ``--repo`` runs another checkout's r1 (e.g. a ``git worktree`` of the commit "before").
The second form plots several such runs on one figure and prints a table: the time each run needed to reach the
first run's final pass@1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def curve(run_dir: Path) -> list[dict]:
    """(step, pass@1, training seconds) at every evaluation of a run, from its metrics.jsonl."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    points, trained_s, prev_time = [], 0.0, None
    for r in rows:
        if "time/step_s" in r:  # a step: its period since the previous log line (a step or an evaluation)
            trained_s += r["time"] - prev_time if prev_time is not None else r["time/step_s"]
        if "eval/pass@1" in r:
            points.append({"step": r["step"], "pass1": r["eval/pass@1"], "train_s": trained_s,
                           "cons": next((v for k, v in r.items() if k.startswith("eval/cons@")), None),
                           "length": r.get("eval/response_length")})
        prev_time = r["time"]
    return points


def run_one(args) -> None:
    sys.path.insert(0, str(args.repo))
    import ray

    from launcher.main import compose
    from r1.driver import run

    run_dir = Path(tempfile.mkdtemp(prefix=f"r1-curve-{args.label}-"))
    cfg = compose([f"run_dir={run_dir}", "logger=none", f"eval.every_steps={args.every}", *args.overrides])
    ray.init(address="local", num_cpus=cfg.cluster.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(args.repo)}})
    start = time.time()
    try:
        run(cfg)
    finally:
        ray.shutdown()
    out = {"label": args.label, "repo": str(args.repo), "overrides": args.overrides, "wall_s": time.time() - start,
           "date": time.strftime("%Y-%m-%d %H:%M"), "points": curve(run_dir)}
    Path(f"{args.label}.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


def plot(paths: list[str], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(Path(p).read_text()) for p in paths]
    target = runs[0]["points"][-1]["pass1"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        ax.plot([p["train_s"] for p in r["points"]], [p["pass1"] for p in r["points"]], marker="o", label=r["label"])
    ax.axhline(target, color="grey", linestyle=":", label=f"{runs[0]['label']} final pass@1 ({target:.3f})")
    ax.set_xlabel("training wall-clock (s, evaluations excluded)")
    ax.set_ylabel("held-out pass@1 (T=0.6, top-p 0.95)")
    ax.set_title("Default experiment: learning per second (2-core CPU)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}\n")
    print("| run | steps | final pass@1 | training s to reach "
          f"{target:.3f} | training s (all steps) | run wall-clock (s) |\n|---|---|---|---|---|---|")
    for r in runs:
        reach = next((p["train_s"] for p in r["points"] if p["pass1"] >= target), None)
        last = r["points"][-1]
        print(f"| {r['label']} | {last['step']} | {last['pass1']:.3f} | "
              f"{f'{reach:.0f}' if reach is not None else 'not reached'} | {last['train_s']:.0f} | {r['wall_s']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="run")
    ap.add_argument("--every", type=int, default=10, help="evaluate every N steps")
    ap.add_argument("--repo", type=Path, default=REPO, help="the r1 checkout to run")
    ap.add_argument("--plot", metavar="PNG", help="plot the given run files instead of running")
    ap.add_argument("rest", nargs="*", help="hydra overrides (run) or run .json files (--plot)")
    args = ap.parse_args()
    if args.plot:
        plot(args.rest, args.plot)
    else:
        args.overrides = args.rest
        run_one(args)


if __name__ == "__main__":
    main()
