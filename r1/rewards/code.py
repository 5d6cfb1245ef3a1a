"""Code accuracy: the response's program, run in the sandbox against the problem's test cases, passes them all.

The program is the last fenced Python block (```python, ```py or unlabelled) of the response's answer: after the
chain of thought's ``</think>``, inside ``<answer>…</answer>`` where there is one. Each stdin/stdout case is a run of
its own (stdin in, stdout compared line by line, trailing whitespace aside); the call-based asserts run in one
process after the program's code. The first failing case ends the check.

Programs of one rollout worker run ``parallel`` at a time, each bounded by the sandbox's limits, so a batch of hanging
programs costs at most ``ceil(programs / parallel) * wall_s`` and scoring runs on a thread beside decoding. Run as
root, each parallel slot is its own user id (``nobody`` and the ids just below), so one program's fork bomb cannot
use up another's process limit. Every run's outcome is counted (``CodeVerifier.stats``): reported as ``sandbox/*``.
"""

from __future__ import annotations

import os
import queue
import re
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from r1.rewards.sandbox import NOBODY, Outcome, SandboxLimits, run_python
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
    """Checks programs against test cases in the sandbox, ``parallel`` at a time; never raises, never hangs longer
    than its limits. ``stats`` counts programs, ``passed``, ``no_program``, ``wrong_output`` and every run's outcome
    (``ok``, ``error``, and the sandbox's denials: ``timeout``, ``cpu_limit``, ``memory_limit``, ...)."""

    def __init__(self, limits: SandboxLimits = SandboxLimits(), parallel: int = 4, uid_base: int = NOBODY):
        self.limits = limits
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="sandbox")
        self._uids: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        for slot in range(parallel):
            self._uids.put(uid_base - slot if os.geteuid() == 0 else None)

    def _count(self, *keys: str) -> None:
        with self._lock:
            self.stats.update(keys)

    def _run(self, source: str, stdin: str, uid: int | None) -> Outcome:
        outcome = run_python(source, stdin, self.limits, uid=uid)
        self._count(outcome.status)
        return outcome

    def passes(self, program: str | None, tests: Sequence[CodeTest]) -> bool:
        """Whether ``program`` passes every one of ``tests``."""
        if program is None:
            self._count("no_program")
            return False
        self._count("programs")
        uid = self._uids.get()  # this thread's slot (one per pool thread: never waits)
        try:
            asserts = [t.assertion for t in tests if t.assertion is not None]
            for test in tests:
                if test.assertion is not None:
                    continue
                outcome = self._run(program, test.stdin or "", uid)
                if outcome.status != "ok" or not same_output(outcome.stdout, test.stdout or ""):
                    if outcome.status == "ok":
                        self._count("wrong_output")
                    return False
            if asserts and self._run(program + "\n\n" + "\n".join(asserts) + "\n", "", uid).status != "ok":
                return False
        finally:
            self._uids.put(uid)
        self._count("passed")
        return True

    def passes_many(self, items: Sequence[tuple[str | None, Sequence[CodeTest]]]) -> list[bool]:
        return list(self._pool.map(lambda item: self.passes(*item), items))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
