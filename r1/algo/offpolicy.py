"""Off-policy correction for asynchronous GRPO: truncated importance weights against the rollout engine.

In async GRPO a sample comes from the rollout engine's policy ``mu`` (possibly several versions old, and computed by
a different engine/kernels than the trainer's). The PPO ratio is taken against ``pi_old`` (the trainer's
recompute with the weights before this update, the "proximal" policy) and each token is further weighted by
``w = min(pi_old / mu, cap)`` (truncated IS, as in IMPALA/V-trace and decoupled PPO): unbiased where the two agree,
bounded variance where they don't.
"""

from __future__ import annotations

import torch


def truncated_is_weights(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, *, cap: float = 2.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """``min(exp(old_logp - rollout_logp), cap)`` per token (1 off the mask), detached; plus stats.

    Stats over masked tokens: ``is_weight_mean``/``is_weight_max`` (before truncation), ``is_clipped_fraction``
    (share truncated) and ``is_log_ratio_abs_mean`` (mean |log pi_old - log mu|, the engines' disagreement).
    """
    m = mask.bool()
    log_ratio = torch.where(m, old_logp.detach() - rollout_logp.detach(), torch.zeros_like(old_logp))
    raw = torch.exp(log_ratio)
    weights = torch.clamp(raw, max=cap)
    n = m.sum().clamp(min=1)
    stats = {
        "is_weight_mean": float((raw * m).sum() / n),
        "is_weight_max": float(raw[m].max()) if m.any() else 1.0,
        "is_clipped_fraction": float(((raw > cap) & m).sum() / n),
        "is_log_ratio_abs_mean": float((log_ratio.abs() * m).sum() / n),
    }
    return weights, stats
