"""Code accuracy: the response's program, run in the sandbox against the problem's test cases, passes them all.

The program is the last fenced Python block (```python, ```py or unlabelled) of the response's answer: after the
chain of thought's ``</think>``, inside ``<answer>…</answer>`` where there is one. Each stdin/stdout case is a run of
its own (stdin in, stdout compared line by line, trailing whitespace aside); the call-based asserts run in one
process after the program's code. The first failing case ends the check.

Programs of one rollout worker run ``parallel`` at a time, each bounded by the sandbox's limits, so a batch of hanging
programs costs at most ``ceil(programs / parallel) * wall_s`` and scoring runs on a thread beside decoding. Run as
root, each parallel slot is its own user id (``nobody`` and the ids just below), so one program's fork bomb cannot
use up another's process limit. Every run's outcome is counted (``CodeVerifier.stats``): reported as ``sandbox/*``.
A sandbox that cannot start is retried (``infra_retries``); if it still cannot, ``infra_error`` is counted and
``SandboxUnavailable`` raised: the program never ran, and a reward of 0 would be a wrong reward.
"""

from __future__ import annotations

import queue
import re
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait

from r1.rewards.sandbox import NOBODY, Outcome, Sandbox, SandboxLimits, SandboxUnavailable
from r1.types import CodeTest

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
PYTHON_LABELS = ("", "python", "python3", "py")


def extract_program(response: str) -> str | None:
    """The last fenced Python block of the response's answer; ``None`` if there is none or it is empty."""
    text = response.rsplit("</think>", 1)[-1]
    if answers := _ANSWER.findall(text):
        text = answers[-1]
    blocks = [code for label, code in _FENCE.findall(text) if label.lower() in PYTHON_LABELS]
    return blocks[-1].strip() or None if blocks else None


def same_output(actual: str, expected: str) -> bool:
    """Judged as competitive-programming checkers do: line by line, whitespace at line ends and trailing blank lines
    aside."""
    def lines(text: str) -> list[str]:
        return [line.rstrip() for line in text.rstrip().splitlines()]

    return lines(actual) == lines(expected)


class CodeVerifier:
    """Checks programs against test cases in the sandbox, ``parallel`` at a time; never hangs longer than its limits.
    ``stats`` counts programs, ``passed``, ``no_program``, ``wrong_output``, every run's outcome (``ok``, ``error``,
    ``exited_early``, ``untrusted_value`` and the sandbox's denials: ``timeout``, ``cpu_limit``, ...), and the
    sandbox's own failures: ``infra_retries``, ``infra_error`` (then ``SandboxUnavailable`` is raised)."""

    def __init__(self, limits: SandboxLimits = SandboxLimits(), parallel: int = 4, uid_base: int = NOBODY):
        self.limits = limits
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="sandbox")
        self._slots: queue.SimpleQueue[Sandbox] = queue.SimpleQueue()
        self._all = [Sandbox(limits, uid_base - slot) for slot in range(parallel)]
        for box in self._all:
            self._slots.put(box)

    def _count(self, *keys: str) -> None:
        with self._lock:
            self.stats.update(keys)

    def _run(self, box: Sandbox, program: str, stdin: str = "", tests: str | None = None) -> Outcome:
        try:
            outcome = box.run(program, stdin) if tests is None else box.run_tests(program, tests)
        except SandboxUnavailable as err:
            self._count(*["infra_retries"] * (err.attempts - 1), "infra_error")
            raise
        self._count(outcome.status, *["infra_retries"] * (outcome.attempts - 1))
        return outcome

    def passes(self, program: str | None, tests: Sequence[CodeTest]) -> bool:
        """Whether ``program`` passes every one of ``tests``."""
        if program is None:
            self._count("no_program")
            return False
        self._count("programs")
        box = self._slots.get()  # this thread's slot (one per pool thread: never waits)
        try:
            asserts = [t.assertion for t in tests if t.assertion is not None]
            for test in tests:
                if test.assertion is not None:
                    continue
                outcome = self._run(box, program, test.stdin or "")
                if outcome.status != "ok" or not same_output(outcome.stdout, test.stdout or ""):
                    if outcome.status == "ok":
                        self._count("wrong_output")
                    return False
            if asserts and self._run(box, program, tests="\n".join(asserts) + "\n").status != "ok":
                return False
        finally:
            self._slots.put(box)
        self._count("passed")
        return True

    def passes_many(self, items: Sequence[tuple[str | None, Sequence[CodeTest]]]) -> list[bool]:
        """Each program's verdict; raises ``SandboxUnavailable`` once every program of the batch has finished, if
        the sandbox could not start for one of them."""
        futures = [self._pool.submit(self.passes, *item) for item in items]
        wait(futures)
        return [f.result() for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for box in self._all:
            box.close()
