"""The clipped policy-gradient objective of PPO/GRPO, with the loss aggregations of GRPO, DAPO and Dr.GRPO."""

from __future__ import annotations

import torch

AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


def aggregate(
    values: torch.Tensor, mask: torch.Tensor, agg: str, *, norm_constant: float | None = None
) -> torch.Tensor:
    """Reduce per-token ``values`` ``[B, T]`` over the tokens where ``mask`` is 1.

    * ``seq_mean_token_mean``: mean over each sequence's tokens, then over sequences (GRPO as published): every
      sequence weighs the same, so a long response's tokens each weigh less.
    * ``token_mean``: mean over all tokens of the batch (DAPO): every token weighs the same.
    * ``seq_mean_token_sum_norm``: per-sequence token *sum* divided by a constant (Dr.GRPO), then mean over
      sequences; the constant defaults to ``T`` (the padded length, i.e. the generation budget).
    """
    mask = mask.to(values.dtype)
    if agg == "token_mean":
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    if agg == "seq_mean_token_mean":
        per_seq = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.mean()
    if agg == "seq_mean_token_sum_norm":
        norm = float(values.shape[-1] if norm_constant is None else norm_constant)
        return ((values * mask).sum(-1) / norm).mean()
    raise ValueError(f"unknown loss aggregation {agg!r}; choose one of {AGGREGATIONS}")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "seq_mean_token_mean",
    entropy: torch.Tensor | None = None,
    norm_constant: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate, ``max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high))`` per token.

    ``logp``/``old_logp``/``mask`` are ``[B, T]`` response-token log-probs under the current and the behaviour
    policy; ``advantages`` is ``[B]`` (broadcast over tokens) or ``[B, T]``. ``clip_high > clip_low`` is DAPO's
    clip-higher. ``is_weights`` ``[B, T]`` (detached, e.g. ``truncated_is_weights``) scale each token's term: the
    off-policy correction of asynchronous GRPO. Gradients flow through ``logp`` only. Returns the loss and float stats: ``clip_fraction`` (share of
    tokens where the clipped branch is active), ``ratio_mean``, ``ratio_max`` and ``entropy`` when given.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.detach().to(logp.dtype)
    # Padding may hold anything (even inf): zero its log-ratio before exp so it cannot poison the gradient.
    ratio = torch.exp(torch.where(mask.bool(), logp - old_logp.detach(), torch.zeros_like(logp)))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights.detach().to(per_token.dtype)
    loss = aggregate(per_token, mask, agg, norm_constant=norm_constant)

    with torch.no_grad():
        m = mask.bool()
        n = m.sum().clamp(min=1)
        stats = {
            "clip_fraction": float(((clipped > unclipped) & m).sum() / n),
            "ratio_mean": float((ratio * m).sum() / n),
            "ratio_max": float(ratio[m].max()) if m.any() else 1.0,
        }
        if entropy is not None:
            stats["entropy"] = float((entropy * m).sum() / n)
    return loss, stats
