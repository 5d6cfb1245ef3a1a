"""Build the embedded default's base model offline: tokenizer, Qwen2- or Llama-architecture LM, pretraining.

Nothing can be downloaded here, so r1 makes its own "base model": a byte-level BPE tokenizer (digits split, R1
tags as single tokens) trained by HF ``tokenizers`` on the synthetic corpus, and a ~1M-parameter model pretrained
on it with plain next-token prediction. The result is an ordinary HF directory (safetensors), cached under
``cache_dir`` by a hash of its spec, and every engine loads it exactly like a real checkpoint.

The two architectures carry their families' token conventions, so the tiny models exercise what real checkpoints
need: ``qwen2`` (the default) has a pad token and no BOS, tied embeddings; ``llama`` has Llama 3's
``<|begin_of_text|>`` BOS added by the tokenizer's post-processor, no pad token, and an untied ``lm_head``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch

from r1.config.validate import ConfigError
from r1.data.arithmetic import all_problems, pretraining_corpus

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {"qwen2": ["<pad>", "</s>"], "llama": ["<|begin_of_text|>", "<|end_of_text|>"]}
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
ARCHS = tuple(SPECIAL_TOKENS)
BUILD_VERSION = 5  # bump when this file changes what it builds


def train_tokenizer(corpus: list[str], vocab_size: int, arch: str = "qwen2"):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if arch not in ARCHS:
        raise ValueError(f"model.arch={arch!r}: the tiny model is built as one of {list(ARCHS)}")
    tok = Tokenizer(models.BPE())
    # GPT-2-like word splitting, except that every digit is its own token (with its leading space): arithmetic
    # stays digit-wise, and a space costs no extra token.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r" ?[0-9]| ?[^\s0-9]+|\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS[arch],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    if arch == "llama":  # as Llama 3: the tokenizer itself prepends BOS; there is no pad token
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|end_of_text|>")
    else:
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")
    # The R1 tags are ordinary (non-special) tokens: one id each, and kept when decoding with skip_special_tokens.
    hf.add_tokens(TAG_TOKENS)
    return hf


def build_model(spec, tokenizer, arch: str = "qwen2"):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    torch.manual_seed(spec.seed)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False, rope_theta=500000.0))
    return Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True, use_sliding_window=False,
                                        rope_theta=10000.0))


def pretrain(model, tokenizer, corpus: list[str], spec, progress=None, stop=None) -> list[float]:
    """Next-token prediction on the corpus; returns the loss curve. AdamW, fixed seed, linear warmup, then cosine
    decay over ``pretrain_steps`` (``pretrain_schedule=cosine``; under selection, the most it may take) or a constant
    rate (``constant``). ``stop(step)`` after each step ends training when true. Documents are packed several to a
    row (``pack_documents``)."""
    from r1.data.tokens import TokenRules

    rules = TokenRules(tokenizer)  # documents start as rollout prompts will: the same BOS rule
    enc = [rules.encode(d) + [rules.eos_id] for d in corpus]
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, spec.pretrain_steps // 20)

    def rate(s: int) -> float:
        ramp = min(1.0, (s + 1) / warmup)
        if spec.pretrain_schedule == "constant":
            return ramp
        return ramp * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, spec.pretrain_steps))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    model.train()
    losses = []
    for step in range(spec.pretrain_steps):
        idx = torch.randint(len(enc), (spec.pretrain_batch_size,), generator=gen).tolist()
        batch = pack_documents([enc[i] for i in idx], rules.pad_id, device=model.device)
        loss = model(**batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, spec.pretrain_steps, losses[-1])
        if stop is not None and stop(step + 1):
            break
    model.eval()
    return losses


def pack_documents(docs: list[list[int]], pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """A batch of documents as few rows as fit, none wider than the longest document (first-fit, longest first):
    about a third less computed than one padded row per document. Each document restarts its position ids at 0,
    which makes the model attend within the document only (transformers builds a block-diagonal causal mask from
    restarting positions when no attention mask and no cache are given: pass ``use_cache=False``), and the first
    token of each is no target (nothing before it in its own document predicts it). The loss is therefore that of
    the padded batch, to float rounding (tests/test_base_selection.py compares the two)."""
    width = max(map(len, docs))
    rows: list[list[list[int]]] = []
    for doc in sorted(docs, key=len, reverse=True):
        row = next((r for r in rows if sum(map(len, r)) + len(doc) <= width), None)
        if row is None:
            rows.append([doc])
        else:
            row.append(doc)
    width = max(sum(map(len, r)) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    positions = torch.zeros_like(ids)  # padding: one-token "documents" at position 0, never a target
    labels = torch.full_like(ids, -100)
    for i, row in enumerate(rows):
        at = 0
        for doc in row:
            tokens = torch.tensor(doc, dtype=torch.long, device=device)
            ids[i, at:at + len(doc)] = tokens
            positions[i, at:at + len(doc)] = torch.arange(len(doc), device=device)
            labels[i, at + 1:at + len(doc)] = tokens[1:]
            at += len(doc)
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


@torch.no_grad()
def held_out_check(model, tokenizer, problems: list[tuple[int, ...]], *, samples: int, template: str,
                   seed: int, max_new_tokens: int = 64, temperature: float = 0.6, top_p: float = 0.95) -> dict:
    """The base model on held-out problems as the run's evaluation samples it (T=0.6, top-p 0.95 by default):
    pass@1 over ``samples`` per problem, the format rate, and how often it chose to think (a running sum in
    <think>) and how often such a chain of thought was right. Sampling is seeded and leaves the global RNG as it
    was, so a check changes nothing of the training it interrupts."""
    from r1.data.arithmetic import question
    from r1.data.template import apply_template
    from r1.data.tokens import TokenRules
    from r1.rewards.extract import extract_answer
    from r1.rewards.format import format_reward

    rules = TokenRules(tokenizer)
    prompts = [rules.encode(apply_template(question(ops), template)) for ops in problems]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), rules.pad_id)
    attn = torch.zeros_like(ids)
    for row, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[row, width - len(p):] = torch.tensor(p)
        attn[row, width - len(p):] = 1
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=temperature,
                             top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, num_return_sequences=samples,
                             pad_token_id=rules.pad_id, eos_token_id=rules.eos_id)
    finally:
        torch.random.set_rng_state(rng_state)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    correct = formatted = thought = thought_right = 0
    for i, text in enumerate(texts):
        ops = problems[i // samples]
        answer = extract_answer(text)
        right = answer is not None and answer.strip() == str(sum(ops))
        careful = text.lstrip().startswith("<think>") and text.lstrip()[len("<think>"):].lstrip()[:1].isdigit()
        correct += right
        formatted += format_reward(text) == 1.0
        thought += careful
        thought_right += careful and right
    n = len(texts)
    return {"pass@1": correct / n, "format_rate": formatted / n, "thinks": thought / n,
            "thinking_accuracy": thought_right / max(1, thought)}


def _as_dict(obj) -> dict:
    if is_dataclass(obj):
        return asdict(obj)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(obj, resolve=True) if OmegaConf.is_config(obj) else dict(obj)


def pretraining_template(template: str) -> str:
    """A base model reads documents, not conversations: a chat-templated run pretrains on the R1-Zero layout."""
    return "r1_zero" if template == "chat" else template


def spec_digest(spec, data_cfg, arch: str = "qwen2") -> str:
    payload = {
        "spec": _as_dict(spec),
        "arch": arch,
        "operands": data_cfg.num_operands,
        "low": data_cfg.operand_low,
        "high": data_cfg.operand_high,
        "template": pretraining_template(data_cfg.template),
        "build": BUILD_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


class BaseModelOutOfBand(ConfigError):
    """Pretraining ended without a held-out check inside ``model.tiny.select_band``: nothing is cached. A
    ConfigError, since the remedy is a setting (r1-launch prints it and exits 2)."""


def check_problems(data_cfg, count: int) -> list[tuple[int, ...]]:
    """Held-out problems for the base model's checks: the *end* of the shuffled held-out list, where the run's
    evaluation takes its first ``eval.max_problems`` from the start (disjoint for the default sizes)."""
    import random

    problems = all_problems(data_cfg.num_operands, data_cfg.operand_low, data_cfg.operand_high, held_out=True)
    random.Random(0).shuffle(problems)
    return problems[-count:]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _merge_checks(a: dict, b: dict) -> dict:
    """Two checks of the same model on the same problems (other seeds) as one of twice the samples."""
    thinks = a["thinks"] + b["thinks"]
    right = a["thinks"] * a["thinking_accuracy"] + b["thinks"] * b["thinking_accuracy"]
    return {"pass@1": (a["pass@1"] + b["pass@1"]) / 2, "format_rate": (a["format_rate"] + b["format_rate"]) / 2,
            "thinks": thinks / 2, "thinking_accuracy": right / thinks if thinks else 0.0}


def _select(spec, model, tokenizer, data_cfg, checks: list[dict], on_check=None):
    """The ``stop`` callback of selection: every ``select_every`` steps a held-out check; true (keep this model)
    once its pass@1 is inside ``select_band`` and the answers it reached by thinking were right at least
    ``select_min_thinking_accuracy`` of the time (GRPO can only teach a base to think if thinking pays: measured, a
    base in the band whose chains of thought were right 16-37% of the time gained 0-9 points in 60 steps, one at
    42% gained 52). A check that passes is repeated with another seed and the two are averaged before deciding:
    the first check over the band's edge can be a lucky one (measured: a model kept at a single check of 13.3%
    evaluated at 9.0%), and keeping it would hand GRPO a base weaker than the band says. Each check starts on a
    quarter of the problems and goes on to all of them only if that quarter's pass@1 reaches half the band's
    floor: most checks come long before the band, and a quick look says so at a third of the cost."""
    low, high = spec.select_band
    problems = check_problems(data_cfg, spec.select_problems)
    template = pretraining_template(data_cfg.template)

    quick = problems[: max(1, len(problems) // 4)]

    def measure(step: int, repeat: int, on: list[tuple[int, ...]] = problems) -> dict:
        model.eval()
        try:
            result = held_out_check(model, tokenizer, on, samples=spec.select_samples, template=template,
                                    seed=spec.seed * 100_003 + step + 7919 * repeat)
        finally:
            model.train()
        return result | {"problems": len(on)}

    def why_not(r: dict) -> str:
        """Empty for a model to keep, else why not."""
        if not low <= r["pass@1"] <= high:
            return "pass@1 outside the band"
        if r["thinking_accuracy"] < spec.select_min_thinking_accuracy:
            return f"chains of thought right < {_pct(spec.select_min_thinking_accuracy)}"
        return ""

    def stop(step: int) -> bool:
        if step % spec.select_every:
            return False
        result = measure(step, 0, quick)
        result["quick"] = result["pass@1"] < low / 2
        if not result["quick"]:
            result = measure(step, 0) | {"quick": False}
        result["repeated"] = not why_not(result)
        if result["repeated"]:
            result |= _merge_checks(result, measure(step, 1))
        result["step"] = step
        result["why_not"] = (f"pass@1 below half the band's floor, a quick look at {len(quick)} of {len(problems)} "
                             f"problems") if result["quick"] else why_not(result)
        result["in_band"] = not result["why_not"]
        checks.append(result)
        if on_check is not None:
            on_check(result, (low, high))
        return result["in_band"]

    return stop


def _out_of_band_message(spec, checks: list[dict]) -> str:
    low, high = spec.select_band
    trail = ", ".join(f"{c['step']}: {_pct(c['pass@1'])}" for c in checks[-8:]) or "none"
    above = [c for c in checks if c["pass@1"] > high]
    if above:
        before = [c for c in checks if c["step"] < above[0]["step"]]
        where = f"step {before[-1]['step']}" if before else "the start"
        return (f"model.tiny: the base model's held-out pass@1 jumped over select_band [{_pct(low)}, {_pct(high)}] "
                f"between {where} and step {above[0]['step']} ({_pct(above[0]['pass@1'])}); check more often "
                f"(model.tiny.select_every={spec.select_every}) or widen model.tiny.select_band. Checks (step: "
                f"pass@1): {trail}")
    skill = (f" with its chains of thought right >= {_pct(spec.select_min_thinking_accuracy)} of the time "
             f"(select_min_thinking_accuracy)" if spec.select_min_thinking_accuracy else "")
    return (f"model.tiny: the base model's held-out pass@1 never entered select_band [{_pct(low)}, {_pct(high)}]"
            f"{skill} in {spec.pretrain_steps} pretraining steps (checks, step: pass@1: {trail}); a base this weak "
            f"gives GRPO almost no reward to learn from. Raise model.tiny.pretrain_steps or pretrain_lr, widen "
            f"model.tiny.select_band, or set it to null to keep the last step's model anyway")


def ensure_tiny_model(spec, data_cfg, cache_dir: str | Path, progress=None, arch: str = "qwen2",
                      on_check=None) -> Path:
    """Path of the cached tiny base model for this spec, building it first if needed (atomic: tmp dir + rename).

    With ``spec.select_band`` the model is *selected*, not just trained: pretraining stops at the first held-out
    check whose pass@1 lies in the band, and that model is kept (``pretrain.json`` records every check and why it
    was kept). Float summation differs between CPU kernels (AVX-512, AVX2, none), so the same seed reaches a given
    skill at different steps on different machines; selecting on the measured skill gives every machine a base the
    demo can learn from. Out of band after ``pretrain_steps``: ``BaseModelOutOfBand``, nothing cached."""
    target = Path(cache_dir) / "models" / f"tiny-{arch}-{spec_digest(spec, data_cfg, arch)}"
    if (target / "config.json").exists():
        return target
    start = time.time()
    corpus = pretraining_corpus(
        spec.pretrain_docs,
        num_operands=data_cfg.num_operands,
        low=data_cfg.operand_low,
        high=data_cfg.operand_high,
        mix=dict(spec.style_mix),
        seed=spec.seed,
        template=pretraining_template(data_cfg.template),
    )
    tokenizer = train_tokenizer(corpus, spec.vocab_size, arch)
    if spec.chat_template:  # (a base model's documents are plain text; the template is what SFT will teach)
        tokenizer.chat_template = spec.chat_template
    model = build_model(spec, tokenizer, arch)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("pretraining tiny base model (%.2fM params) for %s%d steps", n_params / 1e6,
             "at most " if spec.select_band else "", spec.pretrain_steps)
    checks: list[dict] = []
    stop = _select(spec, model, tokenizer, data_cfg, checks, on_check) if spec.select_band else None
    losses = pretrain(model, tokenizer, corpus, spec, progress, stop)
    selection = None
    if spec.select_band:
        if not (checks and checks[-1]["in_band"]):
            raise BaseModelOutOfBand(_out_of_band_message(spec, checks))
        kept = checks[-1]
        selection = {"band": list(spec.select_band), "kept_step": kept["step"], "kept": kept, "checks": checks,
                     "kernels": torch.backends.cpu.get_cpu_capability(),
                     "reason": f"first held-out check inside select_band: pass@1 {_pct(kept['pass@1'])} at step "
                               f"{kept['step']}"}
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "pretrain.json").write_text(
        json.dumps({"params": n_params, "seconds": time.time() - start, "steps": len(losses),
                    "final_loss": losses[-1] if losses else None, "losses": losses, "selection": selection})
    )
    tmp.rename(target)
    return target
