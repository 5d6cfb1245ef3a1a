"""One rule for special tokens, used by the rollout engine, the trainer, evaluation and the tiny model's pretraining.

- **BOS**: a prompt starts with the tokenizer's BOS exactly when the tokenizer itself adds one (Llama 3 does, Qwen2 has
  none). Encoding with ``add_special_tokens=False`` would drop Llama's BOS, and the policy would then be trained and
  evaluated on text it never saw in pretraining. EOS is never appended to a prompt.
- **pad**: padding positions are masked in generation and in training, so any id works; a tokenizer without a pad
  token (Llama 3) pads with its EOS.
"""

from __future__ import annotations


class TokenRules:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id: int = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token: responses could never end")
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("0", add_special_tokens=True)["input_ids"][:1] == [bos]
        self.bos_id: int | None = bos if adds_bos else None

    @classmethod
    def load(cls, model_path: str) -> TokenRules:
        return cls(load_tokenizer(model_path))

    def encode(self, text: str) -> list[int]:
        """``text`` as the model expects a sequence to start: BOS (if the tokenizer uses one), then the text."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` of each text, in one call of the tokenizer (a data set's prompts at load)."""
        out = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [[self.bos_id, *ids] if self.bos_id is not None and ids[:1] != [self.bos_id] else ids for ids in out]


def load_tokenizer(model_path: str):
    """The checkpoint's tokenizer, encoding exactly as its ``tokenizer.json`` says.

    transformers 5 rebuilds the tokenizer of some model types from its own code (``qwen2``: Qwen2's pre-tokenizer
    regex and NFC) whatever the checkpoint's ``tokenizer.json`` holds. For real Qwen checkpoints the two agree; for
    one whose file differs (r1's tiny Qwen2 models keep each digit's leading space in its token) the rebuilt tokenizer
    encodes other ids than the model was trained on: the tiny base model then never emits its format (measured:
    format 100% -> 0%, pass@1 14.7% -> 1.4%). Where the two disagree, the file wins."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    file = Path(model_path) / "tokenizer.json"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if file.is_file() and backend is not None:
        written, rebuilt = json.loads(file.read_text()), json.loads(backend.to_str())
        if any(written.get(k) != rebuilt.get(k) for k in ("normalizer", "pre_tokenizer", "model")):
            return PreTrainedTokenizerFast.from_pretrained(model_path)
    return tokenizer
