"""The RL loss as the train engine sees it: a callable over (log-probs, batch), built from ``algo`` config.

GRPO's and its variants': the policy term (PPO's clip, GSPO's or CISPO's, ``r1.algo.loss``), weighted by the
off-policy correction against the rollout engine (``r1.algo.offpolicy``), plus a KL term. The advantages come with
the batch (``r1.algo.advantages``, chosen by the driver); the engine knows none of this."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1.algo.kl import kl_estimate
from r1.algo.loss import POLICY_LOSS_FNS, aggregate
from r1.algo.offpolicy import rollout_correction


@dataclass
class GRPOLoss:
    """The policy term (``policy_loss``: ppo | gspo | cispo) + (optionally) ``kl_coef * KL(pi || pi_ref)``
    aggregated like the policy term.

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
    policy_loss: str = "ppo"
    # The off-policy correction against the rollout engine's log-probs (``batch.rollout_logprobs``); both "none": off
    is_level: str = "none"
    is_cap: float = 2.0
    mask_level: str = "none"
    mask_low: float = 0.5
    mask_high: float = 5.0

    def __call__(self, logp: torch.Tensor, batch, entropy: torch.Tensor | None):
        mask = batch.response_mask
        old = batch.old_logprobs if batch.old_logprobs is not None else logp.detach()
        weights, is_stats = None, {}
        if batch.rollout_logprobs is not None:  # (its stats - the mismatch canary reads them - even when off)
            weights, is_stats = rollout_correction(
                old, batch.rollout_logprobs, mask, is_level=self.is_level, is_cap=self.is_cap,
                mask_level=self.mask_level, mask_low=self.mask_low, mask_high=self.mask_high)
            if self.is_level == "none" and self.mask_level == "none":
                weights = None
        loss, stats = POLICY_LOSS_FNS[self.policy_loss](
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
