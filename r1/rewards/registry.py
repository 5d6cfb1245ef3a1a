"""Reward terms by name, and their weighted sum (the R1-Zero reward is accuracy + format; R1's reasoning RL adds
language consistency).

A term is either built in (``accuracy``, ``format``, ``language``) or a user function given as ``"package.module:function"``
with signature ``fn(response: str, reference: str) -> float``. Terms are chosen and weighted in ``conf/reward/``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from r1.rewards.extract import FINAL_LINE_PATTERN, extract_answer, make_extractor
from r1.rewards.format import format_reward
from r1.rewards.language import language_consistency
from r1.rewards.verifier import VerifierPool

BUILTIN_TERMS = ("accuracy", "format", "language")


@dataclass
class RewardResult:
    total: list[float]
    components: dict[str, list[float]] = field(default_factory=dict)
    answers: list[str | None] = field(default_factory=list)


def _load_user_term(spec: str) -> Callable[[str, str], float]:
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(
            f"reward term {spec!r} is neither built in {BUILTIN_TERMS} nor of the form 'package.module:function'"
        )
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward term {spec!r} cannot be imported: {err}") from err
    if not callable(fn):
        raise TypeError(f"reward term {spec!r} is not callable")
    return fn


class RuleReward:
    """Scores a batch of responses against references. Owns the math-verify pool (one per rollout worker)."""

    def __init__(self, terms: Sequence[tuple[str, float]], verifier: VerifierPool,
                 extract: Callable[[str], str | None] = extract_answer, language: str = "en"):
        if not terms:
            raise ValueError("reward.terms is empty: give at least one term, e.g. accuracy and format")
        self.terms = [(name, float(weight)) for name, weight in terms]
        self.verifier, self.extract, self.language = verifier, extract, language
        self._user = {name: _load_user_term(name) for name, _ in self.terms if name not in BUILTIN_TERMS}

    def score(self, responses: Sequence[str], references: Sequence[str]) -> RewardResult:
        answers = [self.extract(r) for r in responses]
        components: dict[str, list[float]] = {}
        for name, _ in self.terms:
            if name == "accuracy":
                ok = self.verifier.equivalent_many(list(zip(references, answers, strict=True)))
                components[name] = [float(x) for x in ok]
            elif name == "format":
                components[name] = [format_reward(r) for r in responses]
            elif name == "language":
                components[name] = [language_consistency(r, self.language) for r in responses]
            else:
                components[name] = [float(self._user[name](r, ref)) for r, ref in zip(responses, references)]
        total = [
            sum(weight * components[name][i] for name, weight in self.terms) for i in range(len(responses))
        ]
        return RewardResult(total=total, components=components, answers=answers)


def build_reward(terms: Sequence[tuple[str, float]], *, verify_workers: int = 1, verify_timeout_s: float = 5.0,
                 answer_extractor: str = "answer_tags", final_line_pattern: str = FINAL_LINE_PATTERN,
                 language: str = "en"):
    return RuleReward(terms, VerifierPool(num_workers=verify_workers, timeout_s=verify_timeout_s),
                      make_extractor(answer_extractor, final_line_pattern), language)
