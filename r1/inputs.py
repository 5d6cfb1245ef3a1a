"""What a run needs before any worker starts: its input paths checked, the base model's path and the prompt sets."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from r1.config.validate import ConfigError
from r1.data.prompts import LoadedPrompts, load_prompts

log = logging.getLogger(__name__)


def check_inputs(cfg) -> None:
    """Every input path exists, checked in milliseconds before anything expensive starts (pretraining a tiny model,
    starting Ray, loading weights); each problem names the key to set."""
    problems = []
    evaluated = cfg.stage == "eval" and cfg.eval.checkpoints  # (then the run's own model is not used)
    for i, model in enumerate(cfg.eval.checkpoints if cfg.stage == "eval" else []):
        if not (Path(model) / "config.json").is_file():
            problems.append(f"eval.checkpoints[{i}]={model} is not a Hugging Face model directory (no config.json "
                            "there); a stage's checkpoint is <run_dir>/checkpoints/step_N/policy")
    for i, bench in enumerate(cfg.eval.benchmarks if cfg.stage == "eval" else []):
        if not Path(bench.path).is_file():
            problems.append(f"eval.benchmarks[{i}].path={bench.path} ({bench.name}) does not exist: a jsonl or "
                            "parquet file of problems (docs/evaluation.md)")
    if not evaluated and cfg.model.source == "pretrained" and not (Path(cfg.model.path) / "config.json").is_file():
        problems.append(
            f"model.path={cfg.model.path} is not a local Hugging Face model directory (no config.json there) for "
            f"model {cfg.model.name}. r1 never downloads weights: put the checkpoint there, set R1_MODELS to the "
            f"directory that holds {cfg.model.name}/ (the model configs read ${{R1_MODELS}}/<org>/<name>), or set "
            f"model.path=/path/to/model"
        )
    if cfg.stage == "sft":
        problems += _sft_input_problems(cfg)
    elif cfg.data.generator is None and not (cfg.stage == "eval" and cfg.eval.benchmarks):
        for key in ("train_path", "eval_path"):
            path = cfg.data[key]
            if not Path(path).is_file():
                problems.append(
                    f"data.{key}={path} does not exist: set data.{key} to a jsonl or parquet file with "
                    f"'{cfg.data.prompt_field}' and '{cfg.data.answer_field}' fields (data=math reads ${{R1_DATA}})"
                )
    m = cfg.reward.model
    if any(t.name == "reward_model" for t in cfg.reward.terms) and m.source == "pretrained" and not (
            m.path and (Path(m.path) / "config.json").is_file()):
        problems.append(f"reward.model.path={m.path}: the reward_model term needs a Hugging Face sequence-"
                        "classification model directory (num_labels=1), or reward.model.source=tiny")
    if problems:
        raise ConfigError("missing inputs:\n  - " + "\n  - ".join(problems))


def _sft_input_problems(cfg) -> list[str]:
    from r1.data.sft import GENERATORS

    if not cfg.sft.datasets:
        return ["sft.datasets is empty: give at least one set, e.g. sft.datasets=[{path: data/cold_start.jsonl}]"]
    problems = []
    for i, source in enumerate(cfg.sft.datasets):
        if source.path is None and source.generator is None:
            problems.append(f"sft.datasets[{i}] has no data: set sft.datasets.{i}.path=<jsonl or parquet file> (or "
                            f"a generator: {list(GENERATORS)})")
        elif source.path is not None and source.generator is not None:
            problems.append(f"sft.datasets[{i}]: give a path or a generator, not both")
        elif source.generator is not None and source.generator not in GENERATORS:
            problems.append(f"sft.datasets[{i}].generator={source.generator!r}: choose one of {list(GENERATORS)}")
        elif source.path is not None and not Path(source.path).is_file():
            problems.append(f"sft.datasets[{i}].path={source.path} does not exist: a jsonl or parquet file with "
                            f"'{source.prompt_field}'/'{source.response_field}' or '{source.messages_field}' rows")
        if source.weight <= 0:
            problems.append(f"sft.datasets[{i}].weight={source.weight} must be > 0")
    return problems


def sft_paths(cfg) -> list[str]:
    """The file of each SFT set: its path, or what its generator wrote (cached under cache_dir)."""
    from r1.data.arithmetic import write_direct_answer_file, write_long_cot_file

    d = cfg.data
    task = Path(cfg.cache_dir) / "data" / f"arithmetic-{d.num_operands}x{d.operand_low}-{d.operand_high}"
    paths = []
    for source in cfg.sft.datasets:
        out = task / f"{source.generator}-{source.size}.jsonl"
        if source.generator is None:
            paths.append(source.path)
            continue
        if not out.is_file() and source.generator == "arithmetic_long_cot":
            write_long_cot_file(out, size=source.size, num_operands=d.num_operands, low=d.operand_low,
                                high=d.operand_high)
        elif not out.is_file():  # arithmetic_direct
            write_direct_answer_file(out, size=source.size, low=d.operand_low, high=d.operand_high)
        paths.append(str(out))
    return paths


def prepare_reward_model(cfg) -> str:
    """The reward model's directory: ``reward.model.path``, or the embedded task's, trained (and cached) from the tiny
    base model."""
    m = cfg.reward.model
    if m.source != "tiny":
        return m.path
    from r1.models.tiny import ensure_tiny_model
    from r1.models.tiny_reward import ensure_tiny_reward_model

    base = ensure_tiny_model(cfg.model.tiny, cfg.data, cfg.cache_dir, arch=cfg.model.arch)
    return str(ensure_tiny_reward_model(base, cfg.data, m.tiny_train_steps, cfg.cache_dir, seed=cfg.seed))


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

        def on_check(check: dict, band: tuple[float, float]) -> None:
            verdict = "kept" if check["in_band"] else f"not kept ({check['why_not']})"
            console.print(f"[dim]  base check @ {check['step']}: pass@1 {100 * check['pass@1']:.1f}% (band "
                          f"{100 * band[0]:.0f}-{100 * band[1]:.0f}%), thinks {100 * check['thinks']:.0f}%, right when "
                          f"thinking {100 * check['thinking_accuracy']:.0f}%: {verdict}[/]", soft_wrap=True)

        path = str(ensure_tiny_model(cfg.model.tiny, cfg.data, cfg.cache_dir, progress, arch=cfg.model.arch,
                                     on_check=on_check))
    else:
        path = cfg.model.path
    if cfg.rollout.engine == "vllm":
        check_vllm_can_serve(cfg, path)
    return path


def check_chat_model(cfg) -> None:
    from r1.data.template import check_chat_template
    from r1.data.tokens import load_tokenizer

    if cfg.model.source == "tiny":
        if not cfg.model.tiny.chat_template:
            raise ConfigError("data.template=chat: the tiny model (model.source=tiny) is a base model without a chat "
                              "template; use data.template=r1_zero or plain, or set model.tiny.chat_template "
                              "(model=tiny_student has one)")
        return
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


def context_length(cfg, model_path: str) -> int:
    """Tokens per sequence (prompt + response) the rollout engine allows: ``rollout.vllm.max_model_len`` when set
    for vLLM, else the model's ``max_position_embeddings`` (what vLLM and the HF engine default to)."""
    if cfg.rollout.engine == "vllm" and cfg.rollout.vllm.max_model_len:
        return int(cfg.rollout.vllm.max_model_len)
    config = json.loads((Path(model_path) / "config.json").read_text())
    return int(config.get("max_position_embeddings") or sys.maxsize)


def prompt_fits(prompt_ids: list[int], context: int) -> bool:
    """Whether the engine can generate at least one token after the prompt (vLLM refuses a prompt of
    ``max_model_len`` tokens or more)."""
    return len(prompt_ids) < context


def drop_prompts_beyond_context(cfg, model_path: str, loaded: LoadedPrompts) -> LoadedPrompts:
    """``loaded`` without the prompts that leave the engine no room to answer (templated prompt of the context's
    length or more: vLLM refuses them), counted in ``too_long``. Kept out at load, they never reach a request."""
    from r1.data.template import apply_template
    from r1.data.tokens import TokenRules

    tokens, context = TokenRules.load(model_path), context_length(cfg, model_path)
    ids = tokens.encode_batch([apply_template(p.prompt, cfg.data.template, tokens.tokenizer)
                               for p in loaded.problems])  # (one batch: 10K prompts in < 1 s)
    keep = [p for p, t in zip(loaded.problems, ids, strict=True) if prompt_fits(t, context)]
    too_long = len(loaded.problems) - len(keep)
    if too_long:
        log.warning("%s: %d of %d prompts are %d tokens or longer (templated), the rollout engine's context: "
                    "dropped (raise rollout.vllm.max_model_len or shorten them)", loaded.path, too_long,
                    len(loaded.problems), context)
    if not keep:
        raise ValueError(f"{loaded.path}: no prompt fits the rollout engine's context of {context} tokens")
    return replace(loaded, problems=keep, too_long=too_long)


def prepare_prompts(cfg, model_path: str) -> tuple[LoadedPrompts, LoadedPrompts]:
    """The training and evaluation prompts (``prepare_data``), without those beyond the engine's context."""
    return tuple(drop_prompts_beyond_context(cfg, model_path, s) for s in prepare_data(cfg))


def prepare_data(cfg) -> tuple[LoadedPrompts, LoadedPrompts]:
    train_path, eval_path = cfg.data.train_path, cfg.data.eval_path
    if cfg.data.generator == "arithmetic":
        from r1.data.arithmetic import write_prompt_files

        d = cfg.data
        out = Path(cfg.cache_dir) / "data" / f"arithmetic-{d.num_operands}x{d.operand_low}-{d.operand_high}"
        if d.open_fraction:
            out = out.with_name(f"{out.name}-open{d.open_fraction:g}")
        train_path, eval_path = write_prompt_files(out, num_operands=d.num_operands, low=d.operand_low,
                                                   high=d.operand_high, open_fraction=d.open_fraction)
    elif cfg.data.generator is not None:
        raise ValueError(f"data.generator={cfg.data.generator!r} is unknown; choose 'arithmetic' or null")
    if not train_path or not eval_path:
        raise ValueError("set data.train_path and data.eval_path (jsonl or parquet with prompt/answer fields)")
    fields = {"prompt_field": cfg.data.prompt_field, "answer_field": cfg.data.answer_field,
              "tests_field": cfg.data.tests_field}
    train_set = load_prompts(train_path, **fields, allow_open=cfg.data.allow_open_prompts)
    eval_set = load_prompts(eval_path, **fields)
    if any(p.tests for p in train_set.problems + eval_set.problems):
        check_sandbox()
    return train_set, eval_set


def check_sandbox() -> None:
    """Coding problems need the code sandbox: run a program in it now rather than score every program 0 later."""
    from r1.rewards.sandbox import SandboxLimits, run_python

    try:
        outcome = run_python("print(6 * 7)", "", SandboxLimits(cpu_s=5, wall_s=30))
    except RuntimeError as err:
        raise RuntimeError(f"the data has coding problems (a `tests` field), and {err}") from None
    if outcome.status != "ok" or outcome.stdout.strip() != "42":
        raise RuntimeError("the data has coding problems, and the code sandbox does not run here (bubblewrap needs "
                           f"unprivileged user namespaces or root): {outcome.status}: {outcome.stderr.strip()[-500:]}")
