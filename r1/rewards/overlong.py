"""DAPO's overlong reward shaping (Yu et al. 2025, eq. 13): a soft length penalty over the last tokens of the budget.

A response cut at the generation budget gets no answer, hence no accuracy, although its reasoning may have been
sound: punishing it like a wrong one is noise. DAPO instead adds a penalty that grows linearly over the last
``buffer`` tokens before the budget ``max_tokens``:

    0                                          if length <= max_tokens - buffer
    (max_tokens - buffer - length) / buffer    if max_tokens - buffer < length <= max_tokens   (0 .. -1)
    -1                                         if length > max_tokens

times ``factor`` (verl's ``overlong_buffer.penalty_factor``). DAPO's run: a 20,480-token budget with a 4,096-token
buffer; r1 gives the buffer as a share of the budget (``algo.overlong_buffer_share``, DAPO: 0.2), so it follows the
length schedule (32K -> 64K) instead of staying at a size chosen for one budget.
"""

from __future__ import annotations


def overlong_penalty(length: int, max_tokens: int, buffer: int, factor: float = 1.0) -> float:
    if buffer <= 0:
        raise ValueError(f"the overlong buffer must be at least one token, got {buffer}")
    expected = max_tokens - buffer
    if length <= expected:
        return 0.0
    return -factor * min(1.0, (length - expected) / buffer)


def overlong_buffer_tokens(max_tokens: int, share: float) -> int:
    """The buffer for a budget: ``share`` of it, at least one token."""
    return max(1, round(max_tokens * share))
