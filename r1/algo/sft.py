"""The SFT loss as the train engine sees it: negative log-likelihood of the response tokens, a mean over all of a
batch's response tokens (every token weighs the same, so long chains of thought are learned as fully as short
answers). Cold start, rejection-sampled SFT and distillation all use it; the engine is the GRPO training pool's."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1.algo.loss import aggregate


@dataclass
class SFTLoss:
    temperature: float = 1.0  # (log-probs of the model as it is: no sampling temperature)
    needs_reference: bool = False

    def __call__(self, logp: torch.Tensor, batch, entropy: torch.Tensor | None):
        nll = aggregate(-logp, batch.response_mask, "token_mean")
        return nll, {"nll": nll.item()}

    def units(self, batch) -> float:
        return float(batch.response_mask.sum())
