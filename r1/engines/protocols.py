"""What the driver and workers need from a training engine and a rollout engine, and nothing more.

The HF implementations (``hf_train``, ``hf_rollout``: simple references), vLLM (``vllm_rollout``) and Megatron-core
(``megatron/``) implement these, so swapping engines is a config choice (``trainer.engine``, ``rollout.engine``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from r1.types import Completion, SamplingParams, TrainBatch


class LossFn(Protocol):
    """An algorithm's loss, handed to the train engine, which knows nothing about what it computes."""

    temperature: float
    needs_reference: bool  # the loss reads ``batch.ref_logprobs``; the engine fills them in if the batch has none

    def __call__(
        self, logp: torch.Tensor, batch: TrainBatch, entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of a micro-batch, normalised as a mean over ``units(batch)``; plus float stats."""

    def units(self, batch: TrainBatch) -> float:
        """How many units (tokens or sequences) the loss is a mean over; weights micro-batches and DP ranks."""


class TrainEngine(Protocol):
    """One rank of the training pool. ``data_parallel_rank/size`` say which shard of a mini-batch this rank takes
    (ranks that split the model between them take the same shard). Where ``collective`` is true, ``named_weights``,
    ``save`` and ``load`` are collective: every rank calls them (the model is sharded); otherwise rank 0 alone
    saves and sends."""

    data_parallel_rank: int
    data_parallel_size: int
    collective: bool

    def compute_logprobs(self, batch: TrainBatch, *, temperature: float, reference: bool = False) -> torch.Tensor:
        """[B, L] log-probs of ``batch.input_ids`` under the policy (or the reference policy), no grad. Exact
        where ``batch.response_mask`` is 1 (what every loss reads); an engine may skip prompt positions (0 there)."""

    def train_step(self, batch: TrainBatch, loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step on this rank's shard of a mini-batch (grads are averaged across ranks). Reference
        log-probs the loss needs are computed here, micro-batch by micro-batch (no separate call, no transfer).
        Stats include ``forward_s``, ``backward_s`` and ``optimizer_s`` (this rank's seconds)."""

    def update_reference(self) -> None:
        """Make the reference policy a copy of the current policy."""

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Parameters under their HF names, in a fixed order: what weight sync broadcasts."""

    def save(self, path: Path, *, with_optimizer: bool) -> None: ...

    def load(self, path: Path) -> None: ...


class EngineDead(RuntimeError):
    """The rollout engine can serve no more requests (its processes died); the worker must be replaced."""


class RolloutEngine(Protocol):
    """Request-level and asynchronous: a rollout worker keeps many ``generate`` calls in flight on one engine (vLLM
    batches them continuously) and decides *when* a new policy version is loaded (``load``).

    Weights come one hop from the trainer: the processes holding the engine's weights are members of the sync group
    (``sync_members`` ranks) and stage every version as it arrives; the rollout worker only orchestrates
    (``r1.engines.sync_member``: ``join_sync``, ``wait_staged``, ``load``) and never holds a tensor."""

    version: int  # the policy version now in force
    last_token_time: float  # when the engine last produced a token (the rollout worker's stall watchdog reads it)
    sync_members: int  # ranks this engine contributes to the sync group

    async def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """``params.n`` completions per prompt, in group order (all of prompt 0, then prompt 1, ...). Each completion
        carries its tokens' processed log-probs and, per token, the policy version that sampled it."""

    async def score(self, sequences: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """Per (prompt, response) pair, log p(each response token) at temperature 1 under the weights in force,
        teacher-forced (the mismatch canary's probe, ``r1.monitoring.canary``). Queued like a ``generate`` call."""

    async def join_sync(self, spec) -> None:
        """Join a (re-formed) sync group (``r1.distributed.staged_receiver.SyncSpec``) with every member."""

    async def wait_staged(self, version: int) -> None:
        """Return once ``version`` (the full HF state dict, as ``TrainEngine.named_weights`` sends it) is staged in
        every member."""

    async def load(self, version: int) -> None:
        """Make the staged ``version`` the one in force. Requests in flight are not aborted: they continue from their
        KV cache with the new weights. Returns once the new version is in force."""

    def members_alive(self) -> bool: ...

    def shutdown(self) -> None: ...
