"""A burst of programs through ``CodeVerifier.passes_many``, as a GRPO step's scoring sends them: correct ones
(stdin/stdout and call-based) among wrong, crashing, exiting, lying, forking and spinning ones. Each kind's verdict
and outcome counts are known from how it was built, independently of the verifier.

``python -m tests.sandbox_burst UID_BASE [N]`` prints one JSON line: verdicts, expected verdicts, stats, expected
stats, the processes of the sandbox's users left afterwards, and the seconds it took. The test runs it as it is and
under a PID 1 that never reaps orphans (tests/test_sandbox_burst.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter

from r1.types import CodeTest

ONE_CASE = (CodeTest(stdin="21\n", stdout="42\n"),)  # (a burst of programs, not of cases)
CALLS = (CodeTest(assertion="assert double(21) == 42"), CodeTest(assertion="assert abs(double(0.25) - 0.5) < 1e-9"))
LIES = "class Yes:\n    def __eq__(self, other):\n        return True\n    def __sub__(self, other):\n        return 0\n" \
       "def double(x):\n    return Yes()"

# kind: (program, tests, passes, the outcomes it counts)
KINDS = {
    "correct_stdin": ("print(int(input()) * 2)", ONE_CASE, True, {"ok": 1}),
    "correct_calls": ("def double(x):\n    return 2 * x", CALLS, True, {"ok": 1}),
    "wrong_output": ("print(int(input()) + 1)", ONE_CASE, False, {"ok": 1, "wrong_output": 1}),
    "wrong_calls": ("def double(x):\n    return x + 1", CALLS, False, {"error": 1}),
    "crash": ("raise ValueError('no')", ONE_CASE, False, {"error": 1}),
    "exits_early": ("def double(x):\n    return 0\nraise SystemExit(0)", CALLS, False, {"exited_early": 1}),
    "always_equal": (LIES, CALLS, False, {"untrusted_value": 1}),
    "fork_bomb": ("import os\nwhile True:\n    os.fork()", ONE_CASE, False, {"process_limit": 1}),
    "spin": ("while True:\n    pass", ONE_CASE, False, {"cpu_limit": 1}),
}
RARE = {"fork_bomb": 4, "spin": 4}
SECRET_VARIABLE = "R1_WANDB_API_KEY_PLANTED"  # where the test plants a secret in the verifier's environment
SNOOP = """import glob, os
print(dict(os.environ))
for path in ['/proc/self/environ', '/proc/1/environ', *glob.glob('/proc/*/environ')]:
    try:
        print(path, open(path, 'rb').read())
    except OSError as err:
        print(path, err)
print(os.path.exists('/proc'))
"""  # how many of each of these in a burst; the rest is shared by the others


def burst(n: int) -> list[str]:
    """``n`` kinds, spread through the burst (the rare ones at fixed places)."""
    common = [k for k in KINDS if k not in RARE]
    kinds = [common[i % len(common)] for i in range(n - sum(RARE.values()))]
    for kind, count in RARE.items():
        for j in range(count):
            kinds.insert((j + 1) * len(kinds) // (count + 1), kind)
    return kinds


def leftover(uids: set[int]) -> list[str]:
    """Every process (zombies included) of the given users."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid in uids:
                    with open(f"/proc/{pid}/stat") as f:
                        found.append(f.read().strip()[:120])
            except OSError:
                pass
    return found


def main(uid_base: int, n: int) -> dict:
    from r1.rewards.code import CodeVerifier
    from r1.rewards.sandbox import SandboxLimits

    # (wall >> cpu: the test runs the burst at a lower priority than the tests beside it, which may then take most
    # of the CPU for a while)
    limits = SandboxLimits(cpu_s=1, wall_s=60, memory_mb=256, output_kb=64, processes=16)
    parallel = 4
    kinds = burst(n)
    expected_stats = Counter({"programs": n})
    for kind in kinds:
        expected_stats.update(KINDS[kind][3])
        expected_stats["passed"] += KINDS[kind][2]
    verifier = CodeVerifier(limits, parallel=parallel, uid_base=uid_base)
    started = time.monotonic()
    try:
        verdicts = verifier.passes_many([(KINDS[k][0], KINDS[k][1]) for k in kinds])
    finally:
        seconds = time.monotonic() - started
        verifier.close()
    snooped = None
    if secret := os.environ.get(SECRET_VARIABLE):  # what a program finds of the verifier's environment
        from r1.rewards.sandbox import Sandbox

        with Sandbox(limits, uid_base) as box:
            outcome = box.run(SNOOP)
        snooped = {"status": outcome.status, "secret_seen": secret in outcome.stdout + outcome.stderr}
    return {"kinds": kinds, "verdicts": verdicts, "expected": [KINDS[k][2] for k in kinds],
            "stats": dict(verifier.stats), "expected_stats": dict(expected_stats),
            "left": leftover({uid_base - s for s in range(parallel)}), "seconds": seconds, "uid": os.getuid(),
            "snooped": snooped}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1000)))
