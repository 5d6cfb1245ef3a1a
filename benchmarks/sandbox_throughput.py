"""Benchmark: how many programs per second one rollout worker's code sandbox scores, and what a sandbox start costs.

    .venv/bin/python benchmarks/sandbox_throughput.py [--programs 200] [--parallel 1,2,4]

Programs go through ``CodeVerifier.passes_many`` as a rollout worker sends them (real bubblewrap, the slot hosts, the
harness for call-based tests), each with one test case: a trivial stdin/stdout program, a trivial call-based one,
and one that computes for ~100 ms. Then the cost of one start: a sandboxed ``pass`` (through a slot's host, bwrap,
the namespaces, the interpreter) against a plain ``python3 -I -S -c pass`` from the same Python (subprocess).

Prints a table; copy it, with machine and date, into benchmarks/RESULTS.md. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WORK = "x = 0\nfor i in range({n}):\n    x += i * i\n"  # ~100 ms of CPU at the calibrated n


def _seconds(python: str, source: str, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([python, "-I", "-S", "-c", source], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibrate(python: str) -> tuple[int, float]:
    """Iterations of WORK that take ~100 ms more than ``pass`` on the sandbox's interpreter, and that time."""
    start_s, n = _seconds(python, "pass"), 1_000_000
    n = int(n * 0.1 / (_seconds(python, WORK.format(n=n)) - start_s))
    return n, _seconds(python, WORK.format(n=n)) - start_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=200)
    parser.add_argument("--parallel", default="1,2,4")
    parser.add_argument("--starts", type=int, default=50)
    args = parser.parse_args()

    from r1.rewards.code import CodeVerifier
    from r1.rewards.sandbox import Sandbox, SandboxLimits, _python
    from r1.types import CodeTest

    python, _ = _python()
    n, work_s = calibrate(python)
    limits = SandboxLimits(cpu_s=5, wall_s=30)
    kinds = {
        "trivial stdin/stdout": ("print(int(input()) * 2)", (CodeTest(stdin="21\n", stdout="42\n"),)),
        "trivial call-based": ("def double(x):\n    return 2 * x", (CodeTest(assertion="assert double(21) == 42"),)),
        f"{1000 * work_s:.0f} ms of CPU": (WORK.format(n=n) + "print(int(input()) * 2)", (CodeTest(stdin="21\n", stdout="42\n"),)),
    }
    print(f"# {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()} (sandbox: {python}), "
          f"root={os.geteuid() == 0}, {time.strftime('%Y-%m-%d')}; {args.programs} programs per cell, 1 test each")
    print("\n| program | parallel | programs/s | ms per program (wall) | all passed |")
    print("|---|---|---|---|---|")
    for kind, (program, tests) in kinds.items():
        for parallel in [int(p) for p in args.parallel.split(",")]:
            verifier = CodeVerifier(limits, parallel=parallel, uid_base=61500)
            try:
                verifier.passes_many([(program, tests)] * parallel)  # (hosts started: a worker keeps them)
                start = time.perf_counter()
                verdicts = verifier.passes_many([(program, tests)] * args.programs)
                took = time.perf_counter() - start
            finally:
                verifier.close()
            print(f"| {kind} | {parallel} | {args.programs / took:.1f} | {1000 * took / args.programs:.1f} | "
                  f"{all(verdicts)} |")

    plain, boxed = [], []
    with Sandbox(limits, uid=61500) as box:
        box.run("pass")
        for _ in range(args.starts):
            start = time.perf_counter()
            subprocess.run([python, "-I", "-S", "-c", "pass"], check=True)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            box.run("pass")
            boxed.append(time.perf_counter() - start)
    p, b = statistics.median(plain) * 1000, statistics.median(boxed) * 1000
    print(f"\n| one start ({args.starts} each, median) | ms |\n|---|---|\n| plain `python3 -I -S -c pass` | {p:.1f} |\n"
          f"| sandboxed `pass` (host, bwrap, namespaces, limits, reaping) | {b:.1f} |\n| sandbox's own cost | "
          f"{b - p:.1f} |")


if __name__ == "__main__":
    main()
