"""A decoder's shape (what memory and FLOPs depend on), from its HF ``config.json`` or the presets' published ones.

The planner runs on a login node before anything is queued, where the weights may not be readable yet (or are
large): it needs only the architecture. ``model.path``'s ``config.json`` is read where it exists; otherwise the
``conf/model`` presets' shapes below (copied from each model's ``config.json`` on the Hugging Face hub); the tiny
model's from ``model.tiny``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    qkv_bias: bool  # Qwen2: biases on q, k, v; Llama: none
    max_positions: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_params(self) -> int:
        """One transformer layer: q, k, v, o projections (+ q/k/v biases), SwiGLU MLP (gate, up, down), two RMSNorms."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = self.hidden * (q + 2 * kv) + q * self.hidden + ((q + 2 * kv) if self.qkv_bias else 0)
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def params(self) -> int:
        """All parameters, as HF counts them (a tied output layer is the embedding, counted once)."""
        output = 0 if self.tied else self.embedding_params()
        return self.layers * self.layer_params() + self.embedding_params() + output + self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V of every layer for one token (what a KV cache holds per token)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def _shape(name, hidden, intermediate, layers, heads, kv_heads, vocab, tied, qkv_bias, max_positions):
    return ModelShape(name, hidden, intermediate, layers, heads, kv_heads, vocab, tied, qkv_bias, max_positions)


# conf/model presets, from each model's config.json (huggingface.co/<name>/blob/main/config.json)
PRESETS = {s.name: s for s in [
    _shape("Qwen/Qwen2.5-1.5B", 1536, 8960, 28, 12, 2, 151936, True, True, 131072),
    _shape("Qwen/Qwen2.5-7B", 3584, 18944, 28, 28, 4, 152064, False, True, 131072),
    _shape("Qwen/Qwen2.5-Math-7B", 3584, 18944, 28, 28, 4, 152064, False, True, 4096),
    _shape("Qwen/Qwen2.5-32B", 5120, 27648, 64, 40, 8, 152064, False, True, 131072),
    _shape("meta-llama/Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256, False, False, 131072),
    _shape("meta-llama/Llama-3.1-70B", 8192, 28672, 80, 64, 8, 128256, False, False, 131072),
]}


def from_hf_config(config: dict, name: str = "") -> ModelShape:
    arch = " ".join(config.get("architectures") or [config.get("model_type", "")]).lower()
    heads = config["num_attention_heads"]
    return ModelShape(
        name=name or config.get("_name_or_path", "") or arch, hidden=config["hidden_size"],
        intermediate=config["intermediate_size"], layers=config["num_hidden_layers"], heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads, vocab=config["vocab_size"],
        tied=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=bool(config.get("attention_bias", "qwen2" in arch)),
        max_positions=config.get("max_position_embeddings", 0))


def of_model(model_cfg) -> tuple[ModelShape, str]:
    """The shape of ``model_cfg`` (r1's ``model`` section) and where it came from."""
    if str(model_cfg.source) == "tiny":
        t = model_cfg.tiny
        shape = ModelShape(model_cfg.name, t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads,
                           t.num_kv_heads, t.vocab_size, model_cfg.arch == "qwen2", model_cfg.arch == "qwen2",
                           t.max_position_embeddings)
        return shape, "model.tiny"
    config = Path(str(model_cfg.path or "")).expanduser() / "config.json"
    if model_cfg.path and config.is_file():
        return from_hf_config(json.loads(config.read_text()), str(model_cfg.name)), str(config)
    if model_cfg.name in PRESETS:
        return PRESETS[model_cfg.name], f"r1's table of {model_cfg.name}'s config.json ({config} not readable here)"
    raise ValueError(f"plan: no shape for model {model_cfg.name!r}: {config} is not readable here and it is not one "
                     f"of the presets ({', '.join(PRESETS)}); point model.path at a directory with its config.json")
