"""The R1-Zero format reward: reasoning in <think>, then the answer in <answer>, nothing else."""

from __future__ import annotations

import re

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_LAYOUT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def format_reward(response: str) -> float:
    """1.0 iff the response is exactly ``<think> … </think> <answer> … </answer>`` (whitespace around tags allowed).

    Each tag must appear exactly once and in order, nothing may precede ``<think>`` or follow ``</answer>``, and
    the answer must be non-empty. Nested or repeated tags, a missing closing tag or trailing text give 0.0.
    """
    if any(response.count(tag) != 1 for tag in _TAGS):
        return 0.0
    match = _LAYOUT.fullmatch(response)
    if match is None or not match.group(2).strip():
        return 0.0
    return 1.0
