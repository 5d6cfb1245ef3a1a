"""The embedded task's reward model, built offline: the tiny base model with a scalar head
(``AutoModelForSequenceClassification``, ``num_labels=1``), trained as a Bradley-Terry preference model to prefer a
careful, checked chain of thought in the R1 format over careless and malformed answers of the same prompt.

A stand-in for the helpfulness/harmlessness reward models of R1's all-scenario RL that runs on a laptop: a real
``transformers`` sequence-classification model, served by ``r1.rewards.reward_model`` like any other.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch

from r1.data.arithmetic import (
    all_problems,
    careless_solution,
    long_cot_solution,
    malformed_solution,
    question,
)

log = logging.getLogger(__name__)


def preference_pairs(n: int, *, num_operands: int, low: int, high: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected): the long chain of thought against a careless or malformed answer."""
    rng = random.Random(seed)
    problems = all_problems(num_operands, low, high, held_out=False)
    pairs = []
    for _ in range(n):
        ops = rng.choice(problems)
        bad = careless_solution(ops) if rng.random() < 0.5 else malformed_solution(ops, rng)
        pairs.append((question(ops), " " + long_cot_solution(ops), " " + bad))
    return pairs


def score_texts(model, tokenizer, texts: list[str]) -> torch.Tensor:
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return model(**enc).logits[:, 0]


def ensure_tiny_reward_model(base: str | Path, data_cfg, steps: int, cache_dir: str | Path, seed: int = 0) -> Path:
    """Path of the cached reward model trained from the tiny base model ``base`` (built first if needed)."""
    from transformers import AutoModelForSequenceClassification

    from r1.data.template import apply_template
    from r1.data.tokens import load_tokenizer

    target = Path(cache_dir) / "models" / f"reward-{Path(base).name}-{steps}s{seed}"
    if (target / "config.json").is_file():
        return target
    tokenizer = load_tokenizer(str(base))
    tokenizer.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    pairs = preference_pairs(steps * 16, num_operands=data_cfg.num_operands, low=data_cfg.operand_low,
                             high=data_cfg.operand_high, seed=seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(steps):
        batch = pairs[step * 16:(step + 1) * 16]
        prompts = [apply_template(p, "r1_zero") for p, _, _ in batch]
        chosen = score_texts(model, tokenizer, [p + c for p, (_, c, _) in zip(prompts, batch)])
        rejected = score_texts(model, tokenizer, [p + r for p, (_, _, r) in zip(prompts, batch)])
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("tiny reward model: step %d/%d loss %.4f", step + 1, steps, loss.item())
    model.eval()
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "reward_model.json").write_text(json.dumps({"base": str(base), "steps": steps, "final_loss": loss.item()}))
    tmp.rename(target)
    return target
