"""Write a Megatron policy as a Hugging Face model directory, streamed: no rank ever holds the whole model.

The weights arrive one full HF-named tensor at a time (``bridge.export``: gathered over TP, sent across PP); rank 0
appends them to the current safetensors shard and writes the shard once it reaches ``shard_mb``, then writes the
index and ``config.json``. (mbridge's own ``save_weights`` keeps every tensor of a small model in one dict on rank 0
before writing: the whole-model copy this avoids.) The result loads with ``from_pretrained`` and is what evaluation
and a fresh rollout pool read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_hf_dir(named: Iterable[tuple[str, torch.Tensor]], out_dir: Path, config: dict, *, dtype: torch.dtype,
                 write: bool, shard_mb: float = 2048) -> None:
    """Consume ``named`` (every rank must: the export is collective); the rank with ``write`` writes the directory,
    with ``config`` (the source model's ``config.json``: training changes no architecture) as its ``config.json``."""
    if not write:
        for _ in named:  # (this rank takes part in gathering each tensor; the writing rank keeps them)
            pass
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    written: list[tuple[str, list[str]]] = []
    total = 0

    def flush() -> None:
        if shard:
            name = f"model-{len(written) + 1:05d}.safetensors"
            save_file(shard, str(out_dir / name), metadata={"format": "pt"})
            written.append((name, list(shard)))
            shard.clear()

    for name, tensor in named:
        shard[name] = tensor.detach().to(dtype).contiguous().cpu()
        total += shard[name].nbytes
        if sum(t.nbytes for t in shard.values()) >= shard_mb * 2**20:
            flush()
    flush()
    if len(written) == 1:  # one file: the plain name, as save_pretrained writes a small model
        (out_dir / written[0][0]).rename(out_dir / "model.safetensors")
    else:
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for name, keys in written for k in keys}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = dict(config)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
