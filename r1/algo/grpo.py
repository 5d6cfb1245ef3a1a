"""The GRPO loss as the train engine sees it: a callable over (log-probs, batch), built from ``algo`` config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1.algo.kl import kl_estimate
from r1.algo.loss import aggregate, policy_loss
from r1.algo.offpolicy import truncated_is_weights


@dataclass
class GRPOLoss:
    """``policy_loss`` + (optionally) ``kl_coef * KL(pi || pi_ref)`` aggregated like the policy term.

    Without ``batch.old_logprobs`` (one optimizer step per rollout batch, so the policy *is* the behaviour policy) the
    ratio is ``exp(logp - logp.detach()) = 1`` with the PPO gradient, which saves a forward pass.
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    agg: str = "seq_mean_token_mean"
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    kl_in_loss: bool = True
    temperature: float = 1.0
    norm_constant: float | None = None  # Dr.GRPO's constant (the generation budget)
    # Truncated IS against the rollout engine's log-probs (``batch.rollout_logprobs``); None = off.
    is_cap: float | None = None

    def __call__(self, logp: torch.Tensor, batch, entropy: torch.Tensor | None):
        mask = batch.response_mask
        old = batch.old_logprobs if batch.old_logprobs is not None else logp.detach()
        weights, is_stats = None, {}
        if self.is_cap is not None:
            weights, is_stats = truncated_is_weights(old, batch.rollout_logprobs, mask, cap=self.is_cap)
        loss, stats = policy_loss(
            logp, old, batch.advantages, mask, clip_low=self.clip_low, clip_high=self.clip_high,
            agg=self.agg, entropy=entropy, norm_constant=self.norm_constant, is_weights=weights,
        )
        stats.update(is_stats)
        stats["pg_loss"] = loss.item()
        if self.kl_in_loss and self.kl_coef > 0:
            kl = kl_estimate(logp, batch.ref_logprobs, self.kl_kind)
            loss = loss + self.kl_coef * aggregate(kl, mask, self.agg, norm_constant=self.norm_constant)
            stats["kl"] = float((kl.detach() * mask).sum() / mask.sum().clamp(min=1))
        return loss, stats

    @property
    def needs_reference(self) -> bool:
        """The KL term reads ``batch.ref_logprobs``: the train engine computes them where the batch lacks them."""
        return self.kl_in_loss and self.kl_coef > 0

    def units(self, batch) -> float:
        if self.agg == "token_mean":
            return float(batch.response_mask.sum())
        return float(len(batch))
