"""Benchmark: does the embedded default learn on every machine? The default experiment (`r1-launch`, exactly what
`make demo` runs) over pretraining seeds x CPU kernel variants, each from an empty model cache.

    .venv/bin/python benchmarks/demo_variants.py [--seeds 0 1 2] [--kernels unset avx2 default] [--out FILE]
                                                 [hydra overrides ...]

Float summation order differs between ATen's CPU kernels (AVX-512, AVX2, none: ``ATEN_CPU_CAPABILITY``), so the same
seed pretrains another base model on another processor; ``unset`` is this machine's own choice. Per variant: the
kernels actually used, where base-model selection stopped and what its check measured, the run's held-out pass@1
and cons@4 before and after GRPO, and the wall time of pretraining and of the whole run. Prints a table and writes
the rows (JSON) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def evals(run_dir: Path) -> tuple[dict, dict]:
    """The base (first) and final (last) held-out evaluation of a run, from its metrics.jsonl."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if "eval/pass@1" in r]
    return ev[0], ev[-1]


def run_variant(seed: int, kernels: str, root: Path, overrides: list[str]) -> dict:
    name = f"seed{seed}-{kernels}"
    cache, run_dir = root / name / "cache", root / name / "run"
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if kernels != "unset":
        env["ATEN_CPU_CAPABILITY"] = kernels
    cmd = [str(REPO / ".venv/bin/r1-launch"), f"cache_dir={cache}", f"run_dir={run_dir}", "logger=none",
           f"seed={seed}", f"model.tiny.seed={seed}", *overrides]
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.time() - start
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "stdout.log").write_text(proc.stdout + proc.stderr)
    row = {"seed": seed, "kernels": kernels, "rc": proc.returncode, "wall_s": round(wall, 1)}
    pretrain = next((cache / "models").glob("tiny-*/pretrain.json"), None) if (cache / "models").exists() else None
    if pretrain is not None:
        info = json.loads(pretrain.read_text())
        sel = info.get("selection") or {}
        row.update(pretrain_s=round(info["seconds"], 1), pretrain_steps=info.get("steps"),
                   used_kernels=sel.get("kernels"), check_pass1=(sel.get("kept") or {}).get("pass@1"))
    if proc.returncode == 0:
        base, final = evals(run_dir)
        cons = next(k for k in base if k.startswith("eval/cons@"))
        row.update(base_pass1=base["eval/pass@1"], final_pass1=final["eval/pass@1"], base_cons=base[cons],
                   final_cons=final[cons], base_length=base["eval/response_length"],
                   final_length=final["eval/response_length"])
    else:
        row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
    return row


def table(rows: list[dict]) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    lines = [("| seed | ATEN_CPU_CAPABILITY | kernels used | base kept at step (check pass@1) | base pass@1 | "
              "final pass@1 | change | base cons@4 | final cons@4 | pretrain (s) | run (s) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        change = (f"**{100 * (r['final_pass1'] - r['base_pass1']):+.1f}**" if "final_pass1" in r
                  else f"failed: {r.get('error')}")
        lines.append(f"| {r['seed']} | {r['kernels']} | {r.get('used_kernels', '-')} | {r.get('pretrain_steps', '-')} "
                     f"({pct(r.get('check_pass1'))}) | {pct(r.get('base_pass1'))} | {pct(r.get('final_pass1'))} | "
                     f"{change} | {pct(r.get('base_cons'))} | {pct(r.get('final_cons'))} | {r.get('pretrain_s', '-')} | "
                     f"{r['wall_s']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kernels", nargs="+", default=["unset", "avx2", "default"])
    parser.add_argument("--root", type=Path, default=REPO / "outputs" / "bench_demo_variants")
    parser.add_argument("--out", type=Path, default=None)
    args, overrides = parser.parse_known_args()
    out = args.out or args.root / "rows.json"
    rows = []
    for seed in args.seeds:
        for kernels in args.kernels:
            rows.append(run_variant(seed, kernels, args.root, overrides))
            print(json.dumps(rows[-1]), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "overrides": overrides,
                                       "rows": rows}, indent=1))
    print(table(rows))
    lifts = [r["final_pass1"] - r["base_pass1"] for r in rows if "final_pass1" in r]
    if lifts:
        print(f"\npass@1 change over {len(lifts)} variants: {100 * min(lifts):+.1f} .. {100 * max(lifts):+.1f} pts; "
              f"failed: {len(rows) - len(lifts)}")
    sys.exit(0 if len(lifts) == len(rows) else 1)


if __name__ == "__main__":
    main()
