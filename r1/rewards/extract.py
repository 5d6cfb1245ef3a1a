"""Pull the final answer out of a response, the way the model was taught to give it (``reward.answer_extractor``).

- ``answer_tags``: the last ``<answer>…</answer>`` (the R1-Zero template; a ``\\boxed{}`` inside is left in place,
  math-verify gives boxed content priority);
- ``boxed``: the content of the last ``\\boxed{…}`` (nested braces allowed), what instruct and distilled math models
  write;
- ``final_line``: the first group of ``reward.final_line_pattern`` on the response's last non-empty line that matches
  it, scanning from the end (GSM8K's ``#### 42``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
FINAL_LINE_PATTERN = r"^\s*####\s*(.+?)\s*$"


def extract_answer(response: str) -> str | None:
    """Text inside the last ``<answer>…</answer>``, stripped; ``None`` if there is none or it is empty."""
    found = _ANSWER.findall(response)
    if not found:
        return None
    answer = found[-1].strip()
    return answer or None


def extract_boxed(response: str) -> str | None:
    """The content of the last ``\\boxed{…}`` whose braces close; ``None`` if there is none or it is empty."""
    start = response.rfind("\\boxed{")
    while start != -1:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(response)):
            depth += {"{": 1, "}": -1}.get(response[j], 0)
            if depth == 0:
                return response[i + 1:j].strip() or None
        start = response.rfind("\\boxed{", 0, start)  # unclosed (cut off): the one before
    return None


def final_line_extractor(pattern: str = FINAL_LINE_PATTERN) -> Callable[[str], str | None]:
    regex = re.compile(pattern)
    if regex.groups < 1:
        raise ValueError(f"reward.final_line_pattern {pattern!r} needs a group around the answer, e.g. {FINAL_LINE_PATTERN!r}")

    def extract(response: str) -> str | None:
        for line in reversed(response.splitlines()):
            if line.strip() and (m := regex.search(line)):
                return m.group(1).strip() or None
        return None

    return extract


EXTRACTORS = ("answer_tags", "boxed", "final_line")


def make_extractor(kind: str = "answer_tags", final_line_pattern: str = FINAL_LINE_PATTERN):
    """The extractor ``reward.answer_extractor`` names."""
    if kind == "answer_tags":
        return extract_answer
    if kind == "boxed":
        return extract_boxed
    if kind == "final_line":
        return final_line_extractor(final_line_pattern)
    raise ValueError(f"reward.answer_extractor={kind!r}: choose one of {list(EXTRACTORS)}")
