"""What a run needs before any worker starts: the base model's path and the prompt sets."""

from __future__ import annotations

import logging
from pathlib import Path

from r1.data.prompts import LoadedPrompts, load_prompts

log = logging.getLogger(__name__)


def prepare_model(cfg) -> str:
    """Local directory of the base model: built (and cached) for ``source=tiny``, else ``model.path``."""
    if cfg.model.source == "tiny":
        from rich.console import Console

        from r1.models.tiny import ensure_tiny_model

        console = Console(highlight=False)

        def progress(step: int, total: int, loss: float) -> None:
            if step == 1 or step % 100 == 0 or step == total:
                console.print(f"[dim]pretraining tiny base model: step {step}/{total} loss {loss:.3f}[/]")

        return str(ensure_tiny_model(cfg.model.tiny, cfg.data, cfg.cache_dir, progress))
    if not cfg.model.path:
        raise ValueError(f"model {cfg.model.name!r} needs model.path (a local HF directory)")
    return cfg.model.path


def prepare_data(cfg) -> tuple[LoadedPrompts, LoadedPrompts]:
    train_path, eval_path = cfg.data.train_path, cfg.data.eval_path
    if cfg.data.generator == "arithmetic":
        from r1.data.arithmetic import write_prompt_files

        d = cfg.data
        out = Path(cfg.cache_dir) / "data" / f"arithmetic-{d.num_operands}x{d.operand_low}-{d.operand_high}"
        train_path, eval_path = write_prompt_files(out, num_operands=d.num_operands, low=d.operand_low,
                                                   high=d.operand_high)
    elif cfg.data.generator is not None:
        raise ValueError(f"data.generator={cfg.data.generator!r} is unknown; choose 'arithmetic' or null")
    if not train_path or not eval_path:
        raise ValueError("set data.train_path and data.eval_path (jsonl or parquet with prompt/answer fields)")
    fields = {"prompt_field": cfg.data.prompt_field, "answer_field": cfg.data.answer_field}
    return load_prompts(train_path, **fields), load_prompts(eval_path, **fields)
