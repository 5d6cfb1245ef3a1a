"""Off-policy corrections: weights for the mismatch between the rollout engine's policy ``mu`` and the trainer's.

A sample comes from the rollout engine's ``mu``: possibly several versions old (asynchronous GRPO) and computed by
other kernels in another precision (vLLM bf16 vs the trainer's fp32). The PPO ratio is taken against ``pi_old`` (the
trainer's recompute with the weights before this update, the "proximal" policy), and each token's term is further
weighted by what this module returns, from ``rho_t = pi_old(y_t) / mu(y_t)``:

* importance weight, ``is_level``: ``token`` -> ``min(rho_t, is_cap)`` (truncated IS, as in IMPALA/V-trace and
  decoupled PPO; verl ``rollout_is="token"``); ``sequence`` -> ``min(prod_t rho_t, is_cap)`` on every token of the
  sequence (verl ``rollout_is="sequence"``: unbiased for the sequence, higher variance); ``none`` -> 1;
* mask, ``mask_level``: ``token`` -> tokens whose ``rho_t`` leaves ``[mask_low, mask_high]`` weigh 0 (IcePop, Ring-1T;
  verl's ``rollout_is_threshold="low_high"``); ``sequence`` -> sequences whose *geometric mean* ratio
  ``exp(mean_t log rho_t)`` leaves the bounds weigh 0 (verl ``rollout_rs="seq_mean_k1"``: a length-independent test,
  where the product would reject every long sequence); ``none`` -> kept.

The weight is ``importance weight * mask``, detached. A dropped token keeps its place in the loss's normaliser (it
contributes 0, as in IcePop's objective), so the aggregation stays what ``units`` promised the engine.
"""

from __future__ import annotations

import math

import torch

IS_LEVELS = ("none", "token", "sequence")
MASK_LEVELS = ("none", "token", "sequence")
SAFETY_BOUND = 20.0  # |log ratio| beyond this is clamped before exp (verl's bound): no inf, no NaN


def _quantiles(values: torch.Tensor, qs: tuple[float, ...]) -> list[float]:
    """Quantiles by sorting (``torch.quantile`` refuses more than 2**24 elements: one 65K-token batch has more)."""
    if values.numel() == 0:
        return [1.0] * len(qs)
    ordered = values.float().sort().values
    return [float(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]) for q in qs]


def rollout_correction(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    is_level: str = "token",
    is_cap: float = 2.0,
    mask_level: str = "none",
    mask_low: float = 0.5,
    mask_high: float = 5.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token weights ``[B, T]`` (0 off ``mask``), detached, and their stats over the masked tokens:

    ``is_log_ratio_abs_mean`` (mean |log pi_old - log mu|: the engines' disagreement, what the canary watches),
    ``is_ratio_p05/p50/p95`` (quantiles of ``rho_t``), ``is_weight_mean``/``is_weight_max`` (of the importance weight
    before truncation: ``rho_t``, or the sequence product; ``rho_t`` with ``is_level="none"``), ``is_clipped_fraction`` (tokens truncated at the cap),
    ``mask_token_fraction`` (tokens dropped) and ``mask_seq_fraction`` (sequences with any token dropped).
    """
    if is_level not in IS_LEVELS:
        raise ValueError(f"unknown importance-weight level {is_level!r}; choose one of {IS_LEVELS}")
    if mask_level not in MASK_LEVELS:
        raise ValueError(f"unknown mask level {mask_level!r}; choose one of {MASK_LEVELS}")
    m = mask.bool()
    mf = m.to(old_logp.dtype)
    log_ratio = torch.where(m, old_logp.detach() - rollout_logp.detach(), torch.zeros_like(old_logp))
    lengths = mf.sum(-1).clamp(min=1.0)

    if is_level == "sequence":
        raw = torch.exp(log_ratio.sum(-1, keepdim=True).clamp(-SAFETY_BOUND, SAFETY_BOUND)).expand_as(log_ratio)
    else:  # (none: the token ratios are still what the stats describe)
        raw = torch.exp(log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND))
    weights = raw.clamp(max=is_cap) if is_level != "none" else torch.ones_like(raw)

    if mask_level == "token":
        keep = (log_ratio >= math.log(mask_low)) & (log_ratio <= math.log(mask_high))
    elif mask_level == "sequence":
        geo = (log_ratio.sum(-1) / lengths).unsqueeze(-1)  # log of the geometric-mean ratio
        keep = ((geo >= math.log(mask_low)) & (geo <= math.log(mask_high))).expand_as(log_ratio)
    else:
        keep = torch.ones_like(m)
    weights = (weights * keep.to(weights.dtype) * mf).detach()

    n = m.sum().clamp(min=1)
    ratios = torch.exp(log_ratio[m].clamp(-SAFETY_BOUND, SAFETY_BOUND))
    p05, p50, p95 = _quantiles(ratios, (0.05, 0.5, 0.95))
    dropped = ~keep & m
    rows = m.any(-1)
    stats = {
        "is_log_ratio_abs_mean": float((log_ratio.abs() * mf).sum() / n),
        "is_ratio_p05": p05, "is_ratio_p50": p50, "is_ratio_p95": p95,
        "is_weight_mean": float((raw * mf).sum() / n),
        "is_weight_max": float(raw[m].max()) if m.any() else 1.0,
        "is_clipped_fraction": float(((raw > is_cap) & m).sum() / n) if is_level != "none" else 0.0,
        "mask_token_fraction": float(dropped.sum() / n),
        "mask_seq_fraction": float((dropped.any(-1) & rows).sum() / rows.sum().clamp(min=1)),
    }
    return weights, stats


def truncated_is_weights(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, *, cap: float = 2.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level truncated IS alone: ``min(exp(old_logp - rollout_logp), cap)`` (``rollout_correction``'s
    default)."""
    return rollout_correction(old_logp, rollout_logp, mask, is_level="token", is_cap=cap)
