"""math-verify in a process pool with a hard per-item timeout.

math-verify's own timeouts use ``signal.alarm``, which only works in a process's main thread (not inside Ray
actors' threads), and sympy can run for minutes on adversarial input (``(x+1)^{3000}`` vs ``(x+2)^{3000}``). So every
check runs in a pebble worker process with its own timeout: a hang or a crash kills that process, yields ``False``
and is counted; the caller never stalls.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from pebble import ProcessExpired, ProcessPool


def _parse(text: str):
    from math_verify import parse

    # Our own timeout guards the call; math-verify's signal-based one must be off inside pool workers.
    parsed = parse(text, parsing_timeout=None)
    if not parsed and "$" not in text:
        parsed = parse(f"${text}$", parsing_timeout=None)
    return parsed


def check_equivalent(reference: str, candidate: str) -> bool:
    """True if ``candidate`` is mathematically equal to ``reference`` per math-verify (runs in a pool worker)."""
    gold, pred = _parse(reference), _parse(candidate)
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
            except (ProcessExpired, Exception):  # a crash in sympy/antlr must cost a reward, not the run
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
