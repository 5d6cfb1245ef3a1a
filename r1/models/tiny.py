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

from r1.data.arithmetic import pretraining_corpus

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {"qwen2": ["<pad>", "</s>"], "llama": ["<|begin_of_text|>", "<|end_of_text|>"]}
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
ARCHS = tuple(SPECIAL_TOKENS)
BUILD_VERSION = 3  # bump when this file changes what it builds


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


def pretrain(model, tokenizer, corpus: list[str], spec, progress=None) -> list[float]:
    """Next-token prediction on the corpus; returns the loss curve. Cosine LR, AdamW, fixed seed."""
    from r1.data.tokens import TokenRules

    rules = TokenRules(tokenizer)  # documents start as rollout prompts will: the same BOS rule
    enc = [rules.encode(d) + [rules.eos_id] for d in corpus]
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, spec.pretrain_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup)
        * 0.5
        * (1 + math.cos(math.pi * min(1.0, s / max(1, spec.pretrain_steps)))),
    )
    model.train()
    losses = []
    for step in range(spec.pretrain_steps):
        idx = torch.randint(len(enc), (spec.pretrain_batch_size,), generator=gen).tolist()
        seqs = [enc[i] for i in idx]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), rules.pad_id)
        attn = torch.zeros_like(ids)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
            attn[row, : len(s)] = 1
        labels = ids.masked_fill(attn == 0, -100)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, spec.pretrain_steps, losses[-1])
    model.eval()
    return losses


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


def ensure_tiny_model(spec, data_cfg, cache_dir: str | Path, progress=None, arch: str = "qwen2") -> Path:
    """Path of the cached tiny base model for this spec, building it first if needed (atomic: tmp dir + rename)."""
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
    log.info("pretraining tiny base model (%.2fM params) for %d steps", n_params / 1e6, spec.pretrain_steps)
    losses = pretrain(model, tokenizer, corpus, spec, progress)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "pretrain.json").write_text(
        json.dumps({"params": n_params, "seconds": time.time() - start,
                    "final_loss": losses[-1] if losses else None, "losses": losses})
    )
    tmp.rename(target)
    return target
