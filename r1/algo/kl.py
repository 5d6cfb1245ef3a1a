"""KL(pi || pi_ref) estimators from samples of pi (Schulman, "Approximating KL Divergence", 2020)."""

from __future__ import annotations

import torch

KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL estimate, same shape as ``logp``.

    With ``log_ratio = ref_logp - logp`` (tokens sampled from the policy):
      * ``k1 = -log_ratio``                          unbiased, high variance, can be negative;
      * ``k2 = log_ratio**2 / 2``                    biased, low variance, always >= 0;
      * ``k3 = exp(log_ratio) - log_ratio - 1``      unbiased, low variance, always >= 0 (DeepSeek-R1's choice).
    Gradients flow through ``logp`` only; ``ref_logp`` is a fixed target.
    """
    log_ratio = ref_logp.detach() - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.pow(2)
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {KL_KINDS}")


def kl_shaped_rewards(
    rewards: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    coef: float,
    kind: str = "k1",
) -> torch.Tensor:
    """KL in the reward instead of in the loss: ``r - coef * sum_t kl_t`` per sequence (PPO/RLHF style).

    ``rewards`` is ``[B]``, the others ``[B, T]``. The result carries no gradient: it feeds the advantage.
    """
    kl = kl_estimate(logp.detach(), ref_logp, kind) * mask
    return rewards - coef * kl.sum(dim=-1)
