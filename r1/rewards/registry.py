"""Reward terms by name, and their weighted sum (the R1-Zero reward is accuracy + format; R1's reasoning RL adds
language consistency).

A term is either built in (``accuracy``, ``format``, ``language``) or a user function given as ``"package.module:function"``
with signature ``fn(response: str, reference: str) -> float`` (the reference answer; ``""`` for a coding problem).
Terms are chosen and weighted in ``conf/reward/``.

``accuracy`` is 1 for a correct response: for a math problem its extracted answer equals the reference (math-verify),
for a coding problem its program passes every test case (``r1.rewards.code``, in the sandbox). One batch may mix both.
``reward_model`` is a reward model's score of a general prompt's response (``r1.rewards.reward_model``); 0 for
reasoning prompts, whose rule rewards apply (GRPO compares samples of one prompt only, so the scales never mix).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from r1.rewards.code import CodeVerifier, extract_program
from r1.rewards.extract import FINAL_LINE_PATTERN, extract_answer, make_extractor
from r1.rewards.format import format_reward
from r1.rewards.language import language_consistency
from r1.rewards.sandbox import SandboxLimits
from r1.rewards.verifier import VerifierPool
from r1.types import Reference

BUILTIN_TERMS = ("accuracy", "format", "language", "reward_model")


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
    """Scores a batch of responses against references. Owns the math-verify pool and the code sandbox's verifier
    (one each per rollout worker)."""

    def __init__(self, terms: Sequence[tuple[str, float]], verifier: VerifierPool,
                 extract: Callable[[str], str | None] = extract_answer, language: str = "en",
                 code: CodeVerifier | None = None,
                 reward_model: Callable[[list[str], list[str]], list[float]] | None = None):
        if not terms:
            raise ValueError("reward.terms is empty: give at least one term, e.g. accuracy and format")
        self.terms = [(name, float(weight)) for name, weight in terms]
        self.verifier, self.extract, self.language = verifier, extract, language
        self.code = code or CodeVerifier()
        if reward_model is None and any(name == "reward_model" for name, _ in self.terms):
            raise ValueError("reward term reward_model needs a reward model: set reward.model.path (or "
                             "reward.model.source=tiny)")
        self.reward_model = reward_model
        self._user = {name: _load_user_term(name) for name, _ in self.terms if name not in BUILTIN_TERMS}

    def answers(self, responses: Sequence[str], references: Sequence[Reference]) -> list[str | None]:
        """What each response answers: the program of a coding problem, the final answer of a math one."""
        return [extract_program(r) if ref.is_code else self.extract(r) for r, ref in zip(responses, references)]

    def correct(self, references: Sequence[Reference], answers: Sequence[str | None]) -> list[bool]:
        """Whether each answer is right: math-verify for math problems, the test cases for coding ones."""
        math = [i for i, ref in enumerate(references) if not ref.is_code]
        code = [i for i, ref in enumerate(references) if ref.is_code]
        ok = [False] * len(references)
        for i, good in zip(math, self.verifier.equivalent_many([(references[i].answer, answers[i]) for i in math])):
            ok[i] = good
        for i, good in zip(code, self.code.passes_many([(answers[i], references[i].tests) for i in code])):
            ok[i] = good
        return ok

    def score(self, responses: Sequence[str], references: Sequence[Reference | str],
              prompts: Sequence[str] | None = None) -> RewardResult:
        """``prompts`` (the raw prompt of each response) are what the reward model reads with the response."""
        references = [Reference(ref) if isinstance(ref, str) else ref for ref in references]
        answers = self.answers(responses, references)
        components: dict[str, list[float]] = {}
        for name, _ in self.terms:
            if name == "accuracy":
                components[name] = [float(x) for x in self.correct(references, answers)]
            elif name == "format":
                components[name] = [format_reward(r) for r in responses]
            elif name == "language":
                components[name] = [language_consistency(r, self.language) for r in responses]
            elif name == "reward_model":
                components[name] = self._reward_model(responses, references, prompts)
            else:
                components[name] = [float(self._user[name](r, ref.answer)) for r, ref in zip(responses, references)]
        total = [
            sum(weight * components[name][i] for name, weight in self.terms) for i in range(len(responses))
        ]
        return RewardResult(total=total, components=components, answers=answers)

    def _reward_model(self, responses, references, prompts) -> list[float]:
        scores = [0.0] * len(responses)
        general = [i for i, ref in enumerate(references) if ref.is_open]
        if general:
            if prompts is None:
                raise ValueError("the reward_model term reads the prompts: score(responses, references, prompts)")
            for i, value in zip(general, self.reward_model([prompts[i] for i in general],
                                                           [responses[i] for i in general]), strict=True):
                scores[i] = float(value)
        return scores


def build_reward(terms: Sequence[tuple[str, float]], *, verify_workers: int = 1, verify_timeout_s: float = 5.0,
                 answer_extractor: str = "answer_tags", final_line_pattern: str = FINAL_LINE_PATTERN,
                 language: str = "en", sandbox: SandboxLimits = SandboxLimits(), sandbox_parallel: int = 4,
                 sandbox_uid_base: int | None = None,
                 reward_model: Callable[[list[str], list[str]], list[float]] | None = None):
    uid = {} if sandbox_uid_base is None else {"uid_base": sandbox_uid_base}
    code = CodeVerifier(sandbox, sandbox_parallel, **uid)
    return RuleReward(terms, VerifierPool(num_workers=verify_workers, timeout_s=verify_timeout_s),
                      make_extractor(answer_extractor, final_line_pattern), language, code, reward_model)
