"""Rejection sampling's filters (DeepSeek-R1, stage 3): keep a sample only if it is correct and readable.

Pure functions over one sample, each with its own configurable threshold (``rejection.*``), so every rejection has
one named reason and is counted:

- ``incorrect``: the rule-based verification said no (the reward term ``correct_term``: ``accuracy``, i.e. math-verify or
  the code tests, or a user's verifier);
- ``truncated``: the response hit the length limit (unless ``keep_truncated``), or is longer than
  ``max_response_tokens``;
- ``bad_format``: not ``<think>…</think> <answer>…</answer>`` (``require_format``);
- ``language_mixing``: less than ``min_language_consistency`` of the chain of thought's words are in the target
  language;
- ``repetitive``: more than ``max_repetition`` of its word n-grams (``repetition_ngram``) repeat an earlier one.

Then duplicates (the same prompt and the same response, whitespace aside) and samples beyond ``keep_per_prompt`` of
one prompt are dropped.
"""

from __future__ import annotations

from r1.rewards.format import format_reward
from r1.rewards.language import language_consistency


def repetition(text: str, n: int = 6) -> float:
    """Share of the text's word n-grams that repeat an earlier one (0: none; near 1: a loop)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def rejection_reason(sample, rules, language: str) -> str | None:
    """Why ``sample`` (an ``r1.types.Sample``) is not kept, or None if it is. ``rules``: the ``rejection`` config."""
    if sample.reward_components.get(rules.correct_term, 0.0) != 1.0:
        return "incorrect"
    if (sample.finish_reason == "length" and not rules.keep_truncated) or \
            len(sample.response_ids) > rules.max_response_tokens:
        return "truncated"
    text = sample.response_text
    if rules.require_format and format_reward(text) != 1.0:
        return "bad_format"
    if language_consistency(text, language) < rules.min_language_consistency:
        return "language_mixing"
    if repetition(text, rules.repetition_ngram) > rules.max_repetition:
        return "repetitive"
    return None


def dedup_key(prompt: str, response: str) -> tuple[str, str]:
    return prompt, " ".join(response.split())
