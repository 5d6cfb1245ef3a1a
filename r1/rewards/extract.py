"""Pull the final answer out of a response written in the R1-Zero template."""

from __future__ import annotations

import re

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(response: str) -> str | None:
    """Text inside the last ``<answer>…</answer>``, stripped; ``None`` if there is none or it is empty.

    A ``\\boxed{}`` inside the answer is left in place: math-verify gives boxed content priority when parsing.
    """
    found = _ANSWER.findall(response)
    if not found:
        return None
    answer = found[-1].strip()
    return answer or None
