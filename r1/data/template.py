"""Prompt templates. ``r1_zero`` is Table 1 of the DeepSeek-R1 paper, verbatim."""

from __future__ import annotations

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:"
)

TEMPLATES = {"r1_zero": R1_ZERO_TEMPLATE, "plain": "{prompt}"}


def apply_template(prompt: str, template: str = "r1_zero") -> str:
    try:
        return TEMPLATES[template].format(prompt=prompt)
    except KeyError:
        raise ValueError(f"unknown prompt template {template!r}; choose one of {sorted(TEMPLATES)}") from None
