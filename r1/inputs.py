"""What a run needs before any worker starts: its input paths checked, the base model's path and the prompt sets."""

from __future__ import annotations

import logging
from pathlib import Path

from r1.config.validate import ConfigError
from r1.data.prompts import LoadedPrompts, load_prompts

log = logging.getLogger(__name__)


def check_inputs(cfg) -> None:
    """Every input path exists, checked in milliseconds before anything expensive starts (pretraining a tiny model,
    starting Ray, loading weights); each problem names the key to set."""
    problems = []
    if cfg.model.source == "pretrained" and not (Path(cfg.model.path) / "config.json").is_file():
        problems.append(
            f"model.path={cfg.model.path} is not a local Hugging Face model directory (no config.json there) for "
            f"model {cfg.model.name}. r1 never downloads weights: put the checkpoint there, set R1_MODELS to the "
            f"directory that holds {cfg.model.name}/ (the model configs read ${{R1_MODELS}}/<org>/<name>), or set "
            f"model.path=/path/to/model"
        )
    if cfg.data.generator is None:
        for key in ("train_path", "eval_path"):
            path = cfg.data[key]
            if not Path(path).is_file():
                problems.append(
                    f"data.{key}={path} does not exist: set data.{key} to a jsonl or parquet file with "
                    f"'{cfg.data.prompt_field}' and '{cfg.data.answer_field}' fields (data=math reads ${{R1_DATA}})"
                )
    if problems:
        raise ConfigError("missing inputs:\n  - " + "\n  - ".join(problems))


def prepare_model(cfg) -> str:
    """Local directory of the base model: built (and cached) for ``source=tiny``, else ``model.path``."""
    if cfg.data.template == "chat":  # a base model's tokenizer has none: said before anything is built or started
        check_chat_model(cfg)
    if cfg.model.source == "tiny":
        from rich.console import Console

        from r1.models.tiny import ensure_tiny_model

        console = Console(highlight=False)

        def progress(step: int, total: int, loss: float) -> None:
            if step == 1 or step % 100 == 0 or step == total:
                console.print(f"[dim]pretraining tiny base model: step {step}/{total} loss {loss:.3f}[/]")

        path = str(ensure_tiny_model(cfg.model.tiny, cfg.data, cfg.cache_dir, progress, arch=cfg.model.arch))
    else:
        path = cfg.model.path
    if cfg.rollout.engine == "vllm":
        check_vllm_can_serve(cfg, path)
    return path


def check_chat_model(cfg) -> None:
    from r1.data.template import check_chat_template
    from r1.data.tokens import load_tokenizer

    if cfg.model.source == "tiny":
        raise ConfigError("data.template=chat: the tiny model (model.source=tiny) is a base model without a chat "
                          "template; use data.template=r1_zero or plain")
    try:
        check_chat_template(load_tokenizer(cfg.model.path))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_vllm_can_serve(cfg, model_path: str) -> None:
    """Before any engine starts: the model's architecture, context and KV cache suit vLLM (ConfigError if not)."""
    from r1.engines.vllm_rollout import check_servable

    r = cfg.rollout
    try:
        check_servable(model_path, max_model_len=r.vllm.max_model_len, kv_cache_mb=r.vllm.kv_cache_mb,
                       dtype=cfg.model.dtype,
                       max_tokens=max([s.max_tokens for s in r.length_schedule] + [cfg.eval.max_new_tokens]))
    except ValueError as err:
        raise ConfigError(str(err)) from None


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
