"""SFT data: rows of ``prompt``/``response`` or ``messages``, tokenized exactly as rollouts see them, and a seeded
mixture of several sets with fixed shares per batch (``sft.datasets``).

The prompt is the template (``data.template``) applied to the prompt and encoded by the token rules rollouts use, so
what SFT teaches is what generation later continues. The response ends the way generation ends: with EOS, or with
the chat template's end of turn. A ``messages`` row is a conversation whose last turn is the assistant's response;
with ``data.template=chat`` any number of earlier turns, otherwise exactly one user turn. The response of a chat row
is the assistant's text as written, between the template's generation prompt and its end of turn (templates that
strip earlier turns' reasoning never see it: it is the last turn, rendered as a placeholder).

Unusable rows are skipped and counted by reason: no prompt or response, a malformed conversation, longer than
``sft.max_tokens``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from r1.data.prompts import PromptSampler, read_rows
from r1.data.template import apply_template
from r1.data.tokens import TokenRules
from r1.types import TrainBatch

log = logging.getLogger(__name__)
_PLACEHOLDER = "\x00r1-response\x00"
GENERATORS = ("arithmetic_long_cot", "arithmetic_direct")  # sft.datasets[i].generator: embedded sets (r1/data/arithmetic.py)


@dataclass(frozen=True)
class SFTExample:
    prompt_ids: list[int]
    response_ids: list[int]


@dataclass
class SFTSet:
    path: str
    examples: list[SFTExample]
    skipped: Counter = field(default_factory=Counter)  # reason -> rows


def _conversation(row: dict, source) -> list[dict] | str:
    """The row as a list of {role, content} turns ending with the assistant's, or why it is not one."""
    messages = row.get(source.messages_field)
    if messages is None:
        prompt, response = row.get(source.prompt_field), row.get(source.response_field)
        if not isinstance(prompt, str) or not prompt.strip() or not isinstance(response, str) or not response.strip():
            return "no_prompt_or_response"
        return [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": response}]
    if (not isinstance(messages, list) or len(messages) < 2
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
            or messages[-1].get("role") != "assistant" or not messages[-1]["content"].strip()):
        return "malformed_messages"
    return [{"role": m.get("role"), "content": m["content"]} for m in messages]


def tokenize_conversation(turns: list[dict], template: str, tokens: TokenRules) -> SFTExample | str:
    """Prompt ids (as a rollout encodes them) and response ids (ending as generation ends), or why not."""
    tokenizer = tokens.tokenizer
    response = turns[-1]["content"]
    if template == "chat":
        prompt_text = tokenizer.apply_chat_template(turns[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*turns[:-1], {"role": "assistant", "content": _PLACEHOLDER}],
                                             tokenize=False)
        at = full.find(_PLACEHOLDER)
        if at < 0 or not full.startswith(prompt_text):
            return "chat_template_mismatch"
        response_text = full[len(prompt_text):at] + response + full[at + len(_PLACEHOLDER):]
        response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    else:
        if len(turns) != 2 or turns[0]["role"] != "user":
            return "multi_turn_needs_chat_template"
        prompt_text = apply_template(turns[0]["content"], template, tokenizer)
        response_ids = [*tokenizer(response, add_special_tokens=False)["input_ids"], tokens.eos_id]
    return SFTExample(tokens.encode(prompt_text), response_ids)


def load_sft_set(source, path: str, template: str, tokens: TokenRules, max_tokens: int) -> SFTSet:
    """Every usable row of ``path`` (jsonl or parquet) as an ``SFTExample``; the rest skipped and counted."""
    rows, broken = read_rows(Path(path))
    out = SFTSet(path, [], Counter({"invalid_json": broken} if broken else {}))
    for row in rows:
        turns = _conversation(row, source) if isinstance(row, dict) else "not_an_object"
        example = turns if isinstance(turns, str) else tokenize_conversation(turns, template, tokens)
        if isinstance(example, str):
            out.skipped[example] += 1
        elif len(example.prompt_ids) + len(example.response_ids) > max_tokens:
            out.skipped["longer_than_max_tokens"] += 1
        else:
            out.examples.append(example)
    if out.skipped:
        log.warning("%s: skipped %d rows (%s)", path, sum(out.skipped.values()),
                    ", ".join(f"{k}: {v}" for k, v in sorted(out.skipped.items())))
    if not out.examples:
        raise ValueError(f"{path} has no usable SFT rows (skipped: {dict(out.skipped)}); rows need "
                         f"'{source.prompt_field}' and '{source.response_field}', or '{source.messages_field}'")
    return out


def shares(weights: list[float], batch_size: int) -> list[int]:
    """``batch_size`` split by ``weights`` (largest remainder; ties to the first set): the rows each set gives
    every batch."""
    total = sum(weights)
    exact = [w / total * batch_size for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))[: batch_size - sum(counts)]:
        counts[i] += 1
    return counts


class SFTMixture:
    """Batches drawn from several sets in fixed shares, each set in its own seeded, epoch-shuffled order; the
    positions are the checkpoint's data state, so a resumed run sees exactly the batches the straight one would."""

    def __init__(self, sets: list[SFTSet], weights: list[float], seed: int):
        self.sets, self.weights = sets, weights
        self.samplers = [PromptSampler(len(s.examples), seed + 1_009 * i) for i, s in enumerate(sets)]

    def next_batch(self, batch_size: int) -> list[SFTExample]:
        batch = []
        for s, sampler, count in zip(self.sets, self.samplers, shares(self.weights, batch_size), strict=True):
            batch.extend(s.examples[i] for i in sampler.next_indices(count))
        return batch

    @property
    def epochs(self) -> list[float]:
        """How far through each set: epochs as a fraction."""
        return [s.epoch + s.index / s.size for s in self.samplers]

    def state_dict(self) -> dict:
        return {"samplers": [s.state_dict() for s in self.samplers]}

    def load_state_dict(self, state: dict) -> None:
        for sampler, saved in zip(self.samplers, state["samplers"], strict=True):
            sampler.load_state_dict(saved)


def collate_examples(examples: list[SFTExample], pad_id: int) -> TrainBatch:
    """Right-padded rows, ``response_mask`` on the response tokens (the loss is on the response only)."""
    width = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    response = torch.zeros((len(examples), width), dtype=torch.float32)
    for row, e in enumerate(examples):
        p, r = len(e.prompt_ids), len(e.response_ids)
        ids[row, : p + r] = torch.tensor(e.prompt_ids + e.response_ids)
        attention[row, : p + r] = 1
        response[row, p : p + r] = 1.0
    return TrainBatch(ids, attention, response, advantages=torch.zeros(len(examples)))
