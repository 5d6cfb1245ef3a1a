"""What the driver and workers need from a training engine and a rollout engine, and nothing more.

The CPU implementations (``hf_train``, ``hf_rollout``) and the GPU ones (Megatron-core, vLLM; their own issues)
implement these, so swapping engines is a config choice (``trainer.engine``, ``rollout.engine``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

import torch

from r1.types import Completion, SamplingParams, TrainBatch


class LossFn(Protocol):
    """An algorithm's loss, handed to the train engine, which knows nothing about what it computes."""

    temperature: float

    def __call__(
        self, logp: torch.Tensor, batch: TrainBatch, entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of a micro-batch, normalised as a mean over ``units(batch)``; plus float stats."""

    def units(self, batch: TrainBatch) -> float:
        """How many units (tokens or sequences) the loss is a mean over; weights micro-batches and DP ranks."""


class TrainEngine(Protocol):
    def compute_logprobs(self, batch: TrainBatch, *, temperature: float, reference: bool = False) -> torch.Tensor:
        """[B, L] log-probs of ``batch.input_ids`` under the policy (or the reference policy), no grad."""

    def train_step(self, batch: TrainBatch, loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step on this rank's shard of a mini-batch (grads are averaged across ranks)."""

    def update_reference(self) -> None:
        """Make the reference policy a copy of the current policy."""

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Parameters under their HF names, in a fixed order: what weight sync broadcasts."""

    def save(self, path: Path, *, with_optimizer: bool) -> None: ...

    def load(self, path: Path) -> None: ...


class RolloutEngine(Protocol):
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, between_steps: Callable[[], int] | None = None
    ) -> list[Completion]:
        """``params.n`` completions per prompt, in group order (all of prompt 0, then prompt 1, ...).

        With ``between_steps``, the engine calls it before the first and after every decode step; the hook may load
        new weights and returns the policy version now in force, which the engine records per token in
        ``Completion.token_versions`` (partial rollouts, simulated decode latency).
        """

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy named tensors (HF names, as sent by ``TrainEngine.named_weights``) into the serving model."""

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The serving model's parameters (for checks that a sync is bit-exact)."""
