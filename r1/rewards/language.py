"""The language-consistency reward of DeepSeek-R1's reasoning RL: the share of the chain of thought's words that are
in the target language (the paper adds it to the accuracy reward to stop the model mixing languages).

Script-based, for the paper's two languages: a Han character (CJK ideograph) is one Chinese word; a run of two or
more Latin letters is one English word; a run of letters of any other script is a word of neither. Math is not
language: LaTeX commands (``\\frac``) and math spans (``$…$``, ``\\(…\\)``, ``\\[…\\]``) are removed first, and digits,
symbols and single Latin letters (variables: ``x``, ``n``) are no words. The chain of thought is the text inside
``<think>…</think>`` when there is one, else everything before ``<answer>``. With no word at all nothing is mixed: 1.0.
"""

from __future__ import annotations

import re

LANGUAGES = ("en", "zh")
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_MATH = re.compile(r"\$\$.*?\$\$|\$.*?\$|\\\(.*?\\\)|\\\[.*?\\\]", re.DOTALL)
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_HAN = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(rf"[{_HAN}]|[A-Za-z]{{2,}}(?:'[A-Za-z]+)?|[^\W\d_{_HAN}A-Za-z]+")


def chain_of_thought(response: str) -> str:
    think = _THINK.search(response)
    if think is not None:
        return think.group(1)
    return response.split("<answer>", 1)[0]


def words_by_language(text: str) -> dict[str, int]:
    """{"zh": Han characters, "en": Latin words, "other": words of other scripts} after removing the math."""
    text = _LATEX_COMMAND.sub(" ", _MATH.sub(" ", text))
    counts = {"zh": 0, "en": 0, "other": 0}
    for word in _WORD.findall(text):
        if re.fullmatch(rf"[{_HAN}]", word):
            counts["zh"] += 1
        elif word[0].isascii():
            counts["en"] += 1
        else:
            counts["other"] += 1
    return counts


def language_consistency(response: str, target: str = "en") -> float:
    """Share of the chain of thought's words in ``target`` (``en`` or ``zh``)."""
    if target not in LANGUAGES:
        raise ValueError(f"reward.language={target!r}: choose one of {list(LANGUAGES)}")
    counts = words_by_language(chain_of_thought(response))
    total = sum(counts.values())
    return counts[target] / total if total else 1.0
