"""math-verify in a process pool with a hard per-item timeout.

math-verify's own timeouts use ``signal.alarm``, which only works in a process's main thread (not inside Ray
actors' threads), and sympy can run for minutes on adversarial input (``(x+1)^{3000}`` vs ``(x+2)^{3000}``). So every
check runs in a pebble worker process with its own timeout: a hang or a crash kills that process, yields ``False``
and is counted; the caller never stalls.
"""

from __future__ import annotations

import multiprocessing
import re
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from pebble import ProcessExpired, ProcessPool

# LaTeX delimiters math-verify's LaTeX extraction looks for (an escaped \$ is a currency sign, not a delimiter).
_DELIMITED = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed")
# Two numbers side by side ("1 2", "1\ 2"): LaTeX would read them as one expression (their sum), never an answer.
_NUMBERS_APART = re.compile(r"\d(?:\s|\\[ ;:]|\\quad)+\d")
# Thin spaces and negative spaces inside numbers are thousands formatting: 10,\!000 and 1\,000 are 10000 and 1000.
_NUMBER_SPACING = re.compile(r"(?<=\d)(?:\\!|\\,)(?=\d)|(?<=\d,)\\!(?=\d)")
_PERCENT = re.compile(r"^(.*?)\s*(\\?%)$", re.DOTALL)


def parse_math(text: str) -> list:
    """``text`` (a reference or an extracted answer) as math-verify objects; ``[]`` if it is not one expression.

    - Text with LaTeX delimiters (``$...$``, ``\\(...\\)``, ``\\[...\\]``, ``\\boxed{}``) goes through math-verify's
      LaTeX extraction, boxed content first: what sits inside the delimiters is the answer, prose around it is not.
    - Bare text (MATH-style references such as ``5\\sqrt{3}``, or an answer written without ``$``) is one LaTeX
      expression: it is wrapped in ``$...$`` as a whole and parsed by the LaTeX parser alone. math-verify's default
      configs would also try its plain-number fallback, which reads ``5\\sqrt{3}`` as 5 and ``12-`` as 12; here a
      string that does not parse as a whole is no answer. A trailing full stop is dropped and a trailing ``%``
      kept as a percentage, the way math-verify treats a percent sign after ``$...$``.
    """
    from math_verify import LatexExtractionConfig, parse

    text = text.strip()
    if not _DELIMITED.search(text):
        body = _NUMBER_SPACING.sub("", text.rstrip(".").strip()).replace("{,}", ",")
        if not body or _NUMBERS_APART.search(body):
            return []
        percent = _PERCENT.match(body)
        text = f"${percent.group(1)}$\\%" if percent else f"${body}$"
    # Our own timeout guards the call; math-verify's signal-based one must be off inside pool workers.
    return parse(text, extraction_config=[LatexExtractionConfig(boxed_match_priority=0)],
                 fallback_mode="no_fallback", parsing_timeout=None)


def check_equivalent(reference: str, candidate: str) -> bool:
    """True if ``candidate`` is mathematically equal to ``reference`` per math-verify (runs in a pool worker)."""
    gold, pred = parse_math(reference), parse_math(candidate)
    if not gold or not pred:
        return False
    from math_verify import verify

    return bool(verify(gold, pred, timeout_seconds=None))


def _silence_math_verify() -> None:
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)


@dataclass
class VerifyStats:
    """Counts since the pool was created; reported as metrics so silent reward failures become visible."""

    checked: int = 0
    timeouts: int = 0
    errors: int = 0


class VerifierPool:
    """Pool of math-verify workers: ``equivalent_many`` returns one bool per pair, never raises, never hangs."""

    def __init__(self, num_workers: int = 1, timeout_s: float = 5.0):
        self.timeout_s = timeout_s
        self.stats = VerifyStats()
        self._pool = ProcessPool(
            max_workers=num_workers, context=multiprocessing.get_context("spawn"), initializer=_silence_math_verify
        )

    def equivalent_many(self, pairs: list[tuple[str | None, str | None]]) -> list[bool]:
        """``pairs`` of (reference, candidate); a ``None``/empty side is simply not equivalent."""
        futures = [
            self._pool.schedule(check_equivalent, args=(ref, cand), timeout=self.timeout_s) if ref and cand else None
            for ref, cand in pairs
        ]
        results = []
        for future in futures:
            if future is None:
                results.append(False)
                continue
            self.stats.checked += 1
            try:
                results.append(bool(future.result()))
            except FutureTimeout:
                self.stats.timeouts += 1
                results.append(False)
            except (ProcessExpired, Exception):  # noqa: BLE001 -- a crash in sympy/antlr costs a reward, not the run
                self.stats.errors += 1
                results.append(False)
        return results

    def warm_up(self) -> None:
        """Start the worker processes now (spawn + importing sympy takes ~1 s) instead of at the first real check.

        Not counted in ``stats``."""
        self._pool.schedule(check_equivalent, args=("1", "1")).result()

    def equivalent(self, reference: str | None, candidate: str | None) -> bool:
        return self.equivalent_many([(reference, candidate)])[0]

    def close(self) -> None:
        self._pool.stop()
        self._pool.join(timeout=5)
