"""Rollout engine on HF ``generate``: the CPU path of the generation pool (vLLM takes its place on GPUs).

Reports, for every sampled token, its log-prob under the *untruncated* policy at temperature T (top-p changes
which tokens can be drawn, not the policy being optimised) so the trainer can compare with its own recompute.

It implements the same asynchronous, request-level protocol as the vLLM engine, simply: calls run one at a time on a
thread, and a weight update arriving during one is loaded between two of its decode steps (the KV cache of earlier
tokens is kept, as vLLM's pause(keep) does), with every token labelled by the version that sampled it. As a member
of the weight-sync group it is one rank: this process, which stages versions on a receiver thread as vLLM's workers
do (``r1.distributed.staged_receiver``).

Only the sampling parameters r1 passes shape the distribution: a checkpoint's ``generation_config.json`` (Qwen and
Llama ship ``repetition_penalty``, ``top_k``, ``top_p``, ``temperature``) is replaced by a bare one at load time,
otherwise generation would silently sample from something other than the policy the trainer optimises.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from r1.data.tokens import TokenRules
from r1.distributed.staged_receiver import StagedReceiver, SyncSpec
from r1.engines.sync_member import SyncMember
from r1.types import Completion, SamplingParams


class HFRolloutEngine(SyncMember):
    def __init__(self, model_path: str, *, generate_batch_size: int = 64, dtype: str = "float32",
                 decode_step_s: float = 0.0):
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval().requires_grad_(False)
        tokens = TokenRules.load(model_path)
        self.pad_id, self.eos_id = tokens.pad_id, tokens.eos_id
        self.model.generation_config = GenerationConfig(
            bos_token_id=tokens.bos_id, eos_token_id=self.eos_id, pad_token_id=self.pad_id)
        self.generate_batch_size = generate_batch_size
        self._params = dict(self.model.named_parameters())
        self.decode_step_s = decode_step_s  # emulated decode latency (orchestration benchmarks, fault drills)
        self.version = 0
        self.last_token_time = time.time()
        self._one_at_a_time = threading.Lock()
        self._weights_lock = threading.Lock()  # guards _pending and _generating
        self._pending: tuple[list, int, threading.Event] | None = None
        self._generating = False
        self._receiver: StagedReceiver | None = None

    async def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """See ``RolloutEngine.generate``: runs on a thread, after the calls already queued."""
        return await asyncio.to_thread(self._generate_queued, prompts, params)

    async def score(self, sequences: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """See ``RolloutEngine.score``: one forward pass over the right-padded sequences, after the calls queued."""
        return await asyncio.to_thread(self._score_queued, sequences)

    def _score_queued(self, sequences) -> list[list[float]]:
        with self._one_at_a_time:
            with self._weights_lock:
                self._load_pending()
            return self._score(sequences)

    @torch.no_grad()
    def _score(self, sequences: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        width = max(len(p) + len(r) for p, r in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long, device="cpu")
        attn = torch.zeros_like(ids)
        for row, (p, r) in enumerate(sequences):
            ids[row, : len(p) + len(r)] = torch.tensor(p + r, device="cpu")
            attn[row, : len(p) + len(r)] = 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device)).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None].to(self.device))
        logp = logp.squeeze(-1).cpu()  # position t: log p(token t + 1)
        return [logp[row, len(p) - 1 : len(p) - 1 + len(r)].tolist() for row, (p, r) in enumerate(sequences)]

    async def _join(self, spec: SyncSpec) -> None:
        device = torch.device(self.device)
        self._receiver = StagedReceiver(spec, spec.first_rank, backend="nccl" if device.type == "cuda" else "gloo",
                                        device=device, previous=self._receiver)

    async def load(self, version: int) -> None:
        """Load the staged ``version`` (see ``update_weights``)."""
        weights, release = self._receiver.take(version, self._receiver.spec.timeout_s)  # (staged: no wait)
        try:
            await self.update_weights(weights, version)  # (copies them into the model)
        finally:
            release()

    async def update_weights(self, weights: list[tuple[str, torch.Tensor]], version: int) -> None:
        """Load now if idle, else between two decode steps of the call in flight; returns once loaded."""
        done = threading.Event()
        with self._weights_lock:
            self._pending = (weights, version, done)
            if not self._generating:
                self._load_pending()
        await self._off_loop(done.wait)  # (not the default executor: queued generate calls hold its threads)

    def _load_pending(self) -> None:  # with _weights_lock held
        if self._pending is not None:
            weights, version, done = self._pending
            self.load_weights(weights)
            self.version, self._pending = version, None
            done.set()

    def _between_steps(self) -> int:
        """Called before the first and after every decode step: the only point where weights may change."""
        if self.decode_step_s > 0:  # this step ends no earlier than decode_step_s after the previous one
            time.sleep(max(0.0, self.last_token_time + self.decode_step_s - time.time()))
        self.last_token_time = time.time()
        with self._weights_lock:
            self._load_pending()
            return self.version

    def _generate_queued(self, prompts, params) -> list[Completion]:
        with self._one_at_a_time:
            with self._weights_lock:
                self._load_pending()
                self._generating = True
            try:
                t0 = time.time()
                completions = self._generate(prompts, params)
                if self.decode_step_s > 0:  # a request lasts as long as a full-length one would
                    time.sleep(max(0.0, t0 + self.decode_step_s * params.max_new_tokens - time.time()))
                return completions
            finally:
                with self._weights_lock:
                    self._load_pending()  # an update that arrived after the last decode step
                    self._generating = False

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        expanded = [p for p in prompts for _ in range(params.n)]
        gen = torch.Generator(device="cpu").manual_seed(params.seed)
        completions: list[Completion] = []
        for start in range(0, len(expanded), self.generate_batch_size):
            # One seed per micro-batch, derived from the request seed: reproducible for a fixed request.
            torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=gen, device="cpu")))
            completions.extend(self._generate_batch(expanded[start : start + self.generate_batch_size], params))
        return completions

    def _generate_batch(self, prompts, params: SamplingParams) -> list[Completion]:
        hook = _StepHook(self._between_steps)
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long, device="cpu")
        attn = torch.zeros_like(ids)
        for row, p in enumerate(prompts):  # left padding: generation continues from the last column
            ids[row, width - len(p) :] = torch.tensor(p, device="cpu")
            attn[row, width - len(p) :] = 1
        greedy = params.temperature <= 0
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=attn.to(self.device),
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None if greedy else 0,  # HF samples from the top 50 by default; the policy has no such cut
            max_new_tokens=params.max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            return_dict_in_generate=True,
            output_logits=True,
            logits_processor=LogitsProcessorList([hook]),
        )
        new_tokens = out.sequences[:, width:].cpu()
        logits = torch.stack(out.logits, dim=1).float().cpu()  # [B, T, V], before temperature/top-p
        logp = torch.log_softmax(logits / (1.0 if greedy else params.temperature), dim=-1)
        picked = logp.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        completions = []
        for row in range(len(prompts)):
            tokens = new_tokens[row].tolist()
            if self.eos_id in tokens:
                end, reason = tokens.index(self.eos_id) + 1, "stop"  # the EOS is part of the response
            else:
                end, reason = len(tokens), "length"
            completions.append(Completion(tokens[:end], picked[row, :end].tolist(), reason, hook.labels[:end]))
        return completions

    @torch.no_grad()
    def load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in weights:
            try:
                self._params[name].copy_(tensor)
            except KeyError:
                raise KeyError(f"rollout model has no parameter {name!r}") from None

    def shutdown(self) -> None:
        """Nothing to release: the model goes with the process."""

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The serving model's parameters (for checks that a sync is bit-exact)."""
        for name, param in self.model.named_parameters():
            yield name, param.detach()


class _StepHook(LogitsProcessor):
    """Runs the caller's hook after each forward pass and labels every decode step with the version it returned.

    HF calls a logits processor once per decode step, after the forward pass that produced that step's logits and
    before the next one: the only point where swapping weights is safe. Token ``t`` is labelled with the version
    in force for forward ``t``; the KV cache of earlier tokens is kept (PipelineRL-style in-flight update), so the
    recorded log-probs are exactly the distribution each token was sampled from.
    """

    def __init__(self, hook):
        self.hook = hook
        self.current = hook()
        self.labels: list[int] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.labels.append(self.current)
        self.current = self.hook()
        return scores
