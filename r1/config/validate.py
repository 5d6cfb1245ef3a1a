"""Checks that need more than types: a bad combination fails here, before Ray or any model starts."""

from __future__ import annotations

import dataclasses
import difflib
import typing

from r1.config.schema import R1Config


class ConfigError(ValueError):
    pass


def _fields(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_open(tp) -> bool:
    """Dict- or list-typed fields take arbitrary sub-keys/indices."""
    origin = typing.get_origin(tp)
    return origin in (dict, list) or tp in (dict, list, typing.Any)


def check_key(path: str, root=R1Config) -> None:
    """Raise ConfigError naming the bad part of ``path`` and the valid keys there (with a did-you-mean)."""
    cls, walked = root, []
    for part in path.split("."):
        fields = _fields(cls)
        if part not in fields:
            where = ".".join(walked) or "the top level"
            close = difflib.get_close_matches(part, fields, n=1)
            hint = f" Did you mean '{'.'.join(walked + close)}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{path}': '{part}' is not a key of {where}.{hint}\n"
                f"Valid keys of {where}: {', '.join(sorted(fields))}"
            )
        walked.append(part)
        tp = fields[part]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
            tp = args[0]
        if _is_open(tp):
            return
        if not dataclasses.is_dataclass(tp):
            if part != path.split(".")[-1]:
                raise ConfigError(f"config key '{path}': '{'.'.join(walked)}' is a value, not a section")
            return
        cls = tp


def _vllm_problems(cfg) -> list[str]:
    r, v = cfg.rollout, cfg.rollout.vllm
    problems = []
    if r.simulated_decode_step_s > 0:
        problems.append("rollout.simulated_decode_step_s emulates decode latency in the HF engine only: use "
                        "rollout.engine=hf for orchestration drills, or set it to 0")
    if v.tensor_parallel_size < 1 or v.max_num_seqs < 1 or v.kv_cache_mb < 0:
        problems.append("rollout.vllm: tensor_parallel_size and max_num_seqs must be >= 1, kv_cache_mb >= 0")
    if not 0 < v.gpu_memory_utilization <= 1:
        problems.append("rollout.vllm.gpu_memory_utilization must be in (0, 1]")
    longest = max(s.max_tokens for s in r.length_schedule) if r.length_schedule else 0
    if v.max_model_len is not None and v.max_model_len <= max(longest, cfg.eval.max_new_tokens):
        problems.append(
            f"rollout.vllm.max_model_len={v.max_model_len} leaves no room for a prompt before the longest response "
            f"({max(longest, cfg.eval.max_new_tokens)} tokens, rollout.length_schedule / eval.max_new_tokens)")
    if r.gpus_per_worker > 0 and r.gpus_per_worker != v.tensor_parallel_size:
        # vLLM runs its tensor-parallel ranks as processes of the rollout worker, one per GPU Ray gave the worker
        # (distributed_executor_backend="mp"): fewer GPUs and the ranks do not fit, more and they sit idle
        problems.append(
            f"rollout.gpus_per_worker={r.gpus_per_worker:g} must equal rollout.vllm.tensor_parallel_size="
            f"{v.tensor_parallel_size}: each engine's tensor-parallel ranks run on its worker's own GPUs, one each")
    if r.gpus_per_worker == 0:  # CPU engines: each pins its own cores (VLLM_CPU_OMP_THREADS_BIND)
        import os

        cores = len(os.sched_getaffinity(0))
        wanted = r.num_workers * v.tensor_parallel_size * max(1, r.torch_threads)
        if wanted > cores:
            problems.append(
                f"rollout.engine=vllm on CPU: {r.num_workers} engine(s) x tensor_parallel_size "
                f"{v.tensor_parallel_size} x torch_threads {r.torch_threads} = {wanted} cores, this machine has "
                f"{cores}: lower rollout.num_workers or rollout.torch_threads")
    return problems


def _colocated_problems(cfg) -> list[str]:
    """``rollout.placement=colocated``: engine i shares training rank i's bundle (its GPU)."""
    r, t = cfg.rollout, cfg.trainer
    problems = []
    if r.num_workers > t.num_workers:
        problems.append(f"rollout.placement=colocated puts engine i on training rank i's GPU: rollout.num_workers="
                        f"{r.num_workers} > trainer.num_workers={t.num_workers}; lower it, or use "
                        "rollout.placement=separate")
    if cfg.cluster.kind == "k8s":
        problems.append("rollout.placement=colocated is not supported on Kubernetes (each pool is a worker group of "
                        "its own pods there): use rollout.placement=separate, or cluster=slurm / local")
    if r.engine == "vllm" and r.vllm.tensor_parallel_size != 1:
        problems.append(f"rollout.placement=colocated runs each engine on one training rank's GPU: "
                        f"rollout.vllm.tensor_parallel_size={r.vllm.tensor_parallel_size} must be 1 (or use "
                        "rollout.placement=separate)")
    if (r.gpus_per_worker > 0 or t.gpus_per_worker > 0) and not (r.gpus_per_worker == t.gpus_per_worker == 1):
        problems.append(f"rollout.placement=colocated shares one GPU between a training rank and an engine: set "
                        f"trainer.gpus_per_worker=1 and rollout.gpus_per_worker=1 (got {t.gpus_per_worker:g} and "
                        f"{r.gpus_per_worker:g}), and rollout.vllm.gpu_memory_utilization to the engine's share")
    return problems


def _answer_problems(cfg) -> list[str]:
    """The prompt template and the answer extractor exist (a wrong one would score every response 0)."""
    import re

    from r1.data.template import CHOICES
    from r1.rewards.extract import EXTRACTORS
    from r1.rewards.language import LANGUAGES

    problems = []
    if cfg.data.template not in CHOICES:
        problems.append(f"data.template={cfg.data.template!r}: choose one of {list(CHOICES)}")
    if cfg.reward.language not in LANGUAGES:
        problems.append(f"reward.language={cfg.reward.language!r}: choose one of {list(LANGUAGES)}")
    if cfg.reward.answer_extractor not in EXTRACTORS:
        problems.append(f"reward.answer_extractor={cfg.reward.answer_extractor!r}: choose one of {list(EXTRACTORS)}")
    elif cfg.reward.answer_extractor == "final_line":
        try:
            groups = re.compile(cfg.reward.final_line_pattern).groups
        except re.error as err:
            groups = None
            problems.append(f"reward.final_line_pattern={cfg.reward.final_line_pattern!r} is not a regex: {err}")
        if groups == 0:
            problems.append(f"reward.final_line_pattern={cfg.reward.final_line_pattern!r} needs a group around the "
                            "answer, e.g. '^####\\s*(.+)$'")
    box = cfg.reward.sandbox
    if min(box.cpu_s, box.wall_s, box.memory_mb, box.output_kb, box.processes, box.disk_mb, box.parallel) <= 0:
        problems.append("reward.sandbox: cpu_s, wall_s, memory_mb, output_kb, processes, disk_mb and parallel must "
                        "be > 0 "
                        f"(got {dict(box)})")
    return problems


def _megatron_problems(t) -> list[str]:
    from r1.engines.megatron.engine import RECOMPUTE

    m = t.megatron
    sizes = (m.tensor_parallel, m.pipeline_parallel, m.context_parallel, m.micro_batch_tokens, m.logprob_chunk_tokens)
    if min(sizes) < 1:
        return [("trainer.megatron: tensor_parallel, pipeline_parallel, context_parallel, micro_batch_tokens and "
                 "logprob_chunk_tokens must be >= 1")]
    if m.recompute not in RECOMPUTE:
        return [f"trainer.megatron.recompute={m.recompute!r}: choose one of {list(RECOMPUTE)}"]
    model_parallel = m.tensor_parallel * m.pipeline_parallel * m.context_parallel
    if t.num_workers % model_parallel:
        return [(f"trainer.num_workers={t.num_workers} is not a multiple of trainer.megatron.tensor_parallel x "
                 f"pipeline_parallel x context_parallel = {m.tensor_parallel} x {m.pipeline_parallel} x "
                 f"{m.context_parallel} = {model_parallel} (the rest of the ranks is data parallel): set "
                 f"trainer.num_workers to a multiple of {model_parallel}")]
    return []


def validate(cfg) -> list[str]:
    """Semantic checks on a composed config (strings for enums, as the launcher passes it).

    Raises ConfigError listing every problem; returns warnings (legal settings with a consequence worth saying)."""
    from r1.engines.registry import ROLLOUT_ENGINES, TRAIN_ENGINES
    from r1.rewards.registry import BUILTIN_TERMS

    problems, warnings = [], []
    a, r, t = cfg.algo, cfg.rollout, cfg.trainer
    if a.group_size < 2:
        problems.append(f"algo.group_size={a.group_size}: GRPO needs at least 2 samples per prompt")
    if a.prompts_per_step < 1:
        problems.append("algo.prompts_per_step must be >= 1")
    if not 1 <= a.minibatches_per_step <= a.prompts_per_step * a.group_size:
        problems.append(f"algo.minibatches_per_step={a.minibatches_per_step} must be in [1, batch size]")
    if a.max_sampling_rounds < 1:
        problems.append(f"algo.max_sampling_rounds={a.max_sampling_rounds}: must be >= 1 (1 = no extra sampling)")
    if a.clip_low < 0 or a.clip_high < 0:
        problems.append("algo.clip_low / algo.clip_high must be >= 0")
    if a.kl_coef < 0:
        problems.append("algo.kl_coef must be >= 0")
    if a.max_staleness < 0:
        problems.append("algo.max_staleness must be >= 0 (0 = on-policy)")
    if a.is_cap < 1:
        problems.append(f"algo.is_cap={a.is_cap}: the importance-weight cap must be >= 1")
    if a.kl_placement == "loss" and a.kl_coef > 0 and a.kl_kind == "k1":
        problems.append(
            "algo.kl_kind=k1 with algo.kl_placement=loss: k1 = log pi - log pi_ref has gradient grad log pi, whose "
            "expectation under pi is zero, so the KL term would not pull the policy towards the reference. Use k3 "
            "(DeepSeek-R1) or k2 in the loss, or k1 with algo.kl_placement=reward"
        )
    if not 0 < a.mask_low <= 1 <= a.mask_high:
        problems.append(f"algo.mask_low={a.mask_low}, algo.mask_high={a.mask_high}: the kept ratios must be an "
                        "interval around 1 (0 < mask_low <= 1 <= mask_high), e.g. 0.5 and 5.0 (IcePop)")
    if not 0 <= a.overlong_buffer_share < 1:
        problems.append(f"algo.overlong_buffer_share={a.overlong_buffer_share}: the share of the generation budget "
                        "the overlong penalty ramps over must be in [0, 1) (DAPO: 0.2; 0 = off)")
    if a.policy_loss == "cispo" and a.clip_low < 1:
        warnings.append(f"algo.policy_loss=cispo with algo.clip_low={a.clip_low}: CISPO bounds the importance "
                        "weight from below at 1 - clip_low; MiniMax-M1 sets no lower bound (clip_low >= 1)")
    if a.max_staleness >= 1 and a.is_level == "none" and a.mask_level == "none":
        warnings.append(
            f"algo.max_staleness={a.max_staleness} with algo.is_level=none and algo.mask_level=none: samples up to "
            f"{a.max_staleness} policy versions old are trained as if on-policy (the PPO ratio is taken against the "
            "trainer's own pi_old, nothing weighs by pi_old / pi_rollout), so the gradient is biased towards the "
            "stale policy. Set algo.is_level=token unless that is what you want to measure"
        )
    c = cfg.canary
    if c.enabled and (c.probe_prompts < 1 or c.probe_tokens < 1 or c.every_pushes < 1):
        problems.append("canary.probe_prompts, canary.probe_tokens and canary.every_pushes must be >= 1 (or "
                        "canary.enabled=false)")
    if c.probe_threshold <= 0 or c.batch_threshold <= 0:
        problems.append("canary.probe_threshold and canary.batch_threshold must be > 0")
    tiny = cfg.model.tiny
    from r1.data.arithmetic import STYLES

    unknown = sorted(set(tiny.style_mix) - set(STYLES))
    if unknown or not any(tiny.style_mix.get(k, 0) > 0 for k in STYLES):
        problems.append(f"model.tiny.style_mix: styles {unknown or list(tiny.style_mix)} -- the styles are "
                        f"{list(STYLES)}, with weights >= 0 and at least one > 0")
    if cfg.model.source == "tiny" and tiny.select_band is not None:
        band = list(tiny.select_band)
        if len(band) != 2 or not 0 <= band[0] <= band[1] <= 1:
            problems.append(f"model.tiny.select_band={band}: [low, high] with 0 <= low <= high <= 1 (held-out pass@1 "
                            "of the base model), or null to keep the last pretraining step")
        if not 0 <= tiny.select_min_thinking_accuracy <= 1:
            problems.append(f"model.tiny.select_min_thinking_accuracy={tiny.select_min_thinking_accuracy}: a share "
                            "in [0, 1]")
        if tiny.select_every < 1 or tiny.select_problems < 1 or tiny.select_samples < 1:
            problems.append("model.tiny.select_every, select_problems and select_samples must be >= 1")
    if r.groups_per_request < 0:
        problems.append("rollout.groups_per_request must be >= 0 (0 = one request per worker per step)")
    if r.partial_rollouts and a.max_staleness < 1:
        problems.append(
            "rollout.partial_rollouts=true needs algo.max_staleness >= 1 (on-policy runs never update weights while "
            "generating)"
        )
    if r.simulated_decode_step_s < 0 or t.simulated_update_s < 0:
        problems.append("rollout.simulated_decode_step_s / trainer.simulated_update_s must be >= 0")
    if r.engine not in ROLLOUT_ENGINES:
        problems.append(f"rollout.engine={r.engine!r}: choose one of {list(ROLLOUT_ENGINES)}")
    if t.engine not in TRAIN_ENGINES:
        problems.append(f"trainer.engine={t.engine!r}: choose one of {list(TRAIN_ENGINES)}")
    if r.stall_timeout_s <= 0:
        problems.append("rollout.stall_timeout_s must be > 0")
    if r.placement == "colocated":
        problems += _colocated_problems(cfg)
    problems += _answer_problems(cfg)
    if cfg.health.interval_s <= 0 or cfg.health.stall_minutes < 0:
        problems.append("health.interval_s must be > 0 and health.stall_minutes >= 0 (0 = no watchdog)")
    if r.engine == "vllm":
        problems += _vllm_problems(cfg)
    if t.engine == "megatron":
        problems += _megatron_problems(t)
    if r.temperature <= 0:
        problems.append("rollout.temperature must be > 0 for GRPO sampling")
    if not 0 < r.top_p <= 1 or not 0 < cfg.eval.top_p <= 1:
        problems.append("top_p must be in (0, 1]")
    stages = list(r.length_schedule)
    if not stages or min(s.from_step for s in stages) != 0:
        problems.append("rollout.length_schedule needs a stage with from_step: 0")
    if any(s.max_tokens < 1 for s in stages):
        problems.append("rollout.length_schedule max_tokens must be >= 1")
    for term in cfg.reward.terms:
        if term.name not in BUILTIN_TERMS and ":" not in term.name:
            problems.append(
                f"reward term {term.name!r}: choose one of {list(BUILTIN_TERMS)} or 'package.module:function'"
            )
    terms = [term.name for term in cfg.reward.terms]
    if cfg.stage == "rejection_sampling" and cfg.rejection.correct_term not in terms:
        problems.append(f"rejection.correct_term={cfg.rejection.correct_term!r} is not one of reward.terms {terms}: "
                        "samples would never count as correct")
    if t.num_workers < 1 or r.num_workers < 1:
        problems.append("trainer.num_workers and rollout.num_workers must be >= 1")
    if cfg.eval.k < 1:
        problems.append("eval.k must be >= 1")
    if cfg.model.source == "tiny":
        from r1.models.tiny import ARCHS

        if cfg.model.arch not in ARCHS:
            problems.append(f"model.arch={cfg.model.arch!r}: the tiny model is built as one of {list(ARCHS)}")
    if cfg.model.source == "pretrained" and not cfg.model.path:
        problems.append(f"model {cfg.model.name!r}: set model.path to a local HF directory")
    if cfg.data.generator is None and not (cfg.data.train_path and cfg.data.eval_path):
        problems.append("data: set data.train_path and data.eval_path, or data.generator=arithmetic")
    if cfg.data.generator is not None and (cfg.data.train_path or cfg.data.eval_path):
        problems.append(
            f"data.train_path / data.eval_path are set, but data.generator={cfg.data.generator} writes its own prompt "
            "files and would ignore them: add data.generator=null to train on your files"
        )
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    return warnings
