"""Pure functions from per-sample results to the paper's metrics; equivalence is injected (math-verify in practice)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


def _canonical(answer: str) -> str:
    return "".join(answer.split()).rstrip(".")


def majority_answer(answers: Sequence[str | None], equivalent: Callable[[str, str], bool]) -> str | None:
    """The answer most samples agree on, grouping answers that ``equivalent`` says are equal.

    ``None`` (no answer extracted) never votes. Ties go to the class seen first, so the result is deterministic.
    Identical strings (after whitespace removal) are grouped without calling ``equivalent``.
    """
    classes: list[list[str]] = []
    for answer in answers:
        if not answer:
            continue
        for members in classes:
            rep = members[0]
            if _canonical(rep) == _canonical(answer) or equivalent(rep, answer):
                members.append(answer)
                break
        else:
            classes.append([answer])
    if not classes:
        return None
    return max(classes, key=len)[0]  # max keeps the first of equal lengths


@dataclass
class EvalSummary:
    """Per-problem results: ``pass1`` is the fraction of the k samples that were correct."""

    pass1: float
    cons_correct: bool
    format_rate: float


def summarize_problem(
    correct: Sequence[bool],
    formatted: Sequence[float],
    answers: Sequence[str | None],
    equivalent: Callable[[str, str], bool],
) -> EvalSummary:
    """cons@k is right when the majority answer is: the sample that first gave it was judged correct (its class
    members are equivalent to it, so they agree)."""
    k = len(correct)
    if k == 0:
        raise ValueError("a problem needs at least one sample")
    majority = majority_answer(answers, equivalent)
    return EvalSummary(
        pass1=sum(map(float, correct)) / k,
        cons_correct=majority is not None and bool(correct[list(answers).index(majority)]),
        format_rate=sum(formatted) / k,
    )
