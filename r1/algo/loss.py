"""Policy-gradient objectives - PPO/GRPO's clipped surrogate, GSPO's sequence-ratio clip, CISPO's clipped
importance weight - with the loss aggregations of GRPO, DAPO and Dr.GRPO."""

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


POLICY_LOSSES = ("ppo", "gspo", "cispo")


def _log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Padding may hold anything (even inf): zero its log-ratio before exp so it cannot poison the gradient.
    return torch.where(mask.bool(), logp - old_logp.detach(), torch.zeros_like(logp))


def _advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return (advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages).detach().to(like.dtype)


def _finish(per_token, ratio, clipped_mask, mask, agg, norm_constant, is_weights, entropy):
    """Weight, aggregate, and the stats every policy loss reports."""
    if is_weights is not None:
        per_token = per_token * is_weights.detach().to(per_token.dtype)
    loss = aggregate(per_token, mask, agg, norm_constant=norm_constant)
    with torch.no_grad():
        m = mask.bool()
        n = m.sum().clamp(min=1)
        stats = {
            "clip_fraction": float((clipped_mask & m).sum() / n),
            "ratio_mean": float((ratio * m).sum() / n),
            "ratio_max": float(ratio[m].max()) if m.any() else 1.0,
        }
        if entropy is not None:
            stats["entropy"] = float((entropy * m).sum() / n)
    return loss, stats


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
    clip-higher. ``is_weights`` ``[B, T]`` (detached, from ``r1.algo.offpolicy.rollout_correction``) scale each
    token's term: the off-policy correction. Gradients flow through ``logp`` only. Returns the loss and float stats:
    ``clip_fraction`` (share of tokens where the clipped branch is active), ``ratio_mean``, ``ratio_max`` and
    ``entropy`` when given.
    """
    adv = _advantages(advantages, logp)
    ratio = torch.exp(_log_ratio(logp, old_logp, mask))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return _finish(torch.maximum(unclipped, clipped), ratio, clipped > unclipped, mask, agg, norm_constant,
                   is_weights, entropy)


def gspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    agg: str = "seq_mean_token_mean",
    entropy: torch.Tensor | None = None,
    norm_constant: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO (Zheng et al. 2025): the PPO clip on the *sequence* ratio ``s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|)``.

    Per token (GSPO-token, the paper's eq. 13-14): ``s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)]``, equal to ``s_i`` in
    value, with the gradient of ``s_i`` spread over the tokens: ``max(-A * s_i,t, -A * clip(s_i,t, 1 - clip_low,
    1 + clip_high))``. A whole sequence is clipped or not, so one outlier token cannot mute its sequence's others.
    The paper's ranges are 3e-4 / 4e-4 (a length-normalised ratio moves little); its aggregation is a mean over
    sequences of token means. ``log s_i`` is clamped at 10 (as verl does) so exp cannot overflow.
    """
    adv = _advantages(advantages, logp)
    m = mask.to(logp.dtype)
    token_log = _log_ratio(logp, old_logp, mask)
    seq_log = (token_log * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    ratio = torch.exp(torch.clamp(logp - logp.detach() + seq_log.detach(), max=10.0))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return _finish(torch.maximum(unclipped, clipped), ratio, clipped > unclipped, mask, agg, norm_constant,
                   is_weights, entropy)


def cispo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 1.0,
    clip_high: float = 4.0,
    agg: str = "token_mean",
    entropy: torch.Tensor | None = None,
    norm_constant: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CISPO (MiniMax-M1, 2025): clip the importance *weight*, not the update: ``-sg[clip(r, 1 - clip_low,
    1 + clip_high)] * A * log pi(y_t)`` per token (a REINFORCE term).

    PPO's clip zeroes the gradient of a token whose ratio left the range, and in reasoning RL those are often the
    rare "fork" tokens (however, wait, ...); CISPO keeps every token's gradient and bounds only its weight. MiniMax
    sets no lower bound (``clip_low`` >= 1 keeps ``1 - clip_low <= 0``) and tunes the upper one; token-mean
    aggregation. The log ratio is clamped to [-20, 20] before exp (as verl does).
    """
    adv = _advantages(advantages, logp)
    ratio = torch.exp(torch.clamp(_log_ratio(logp, old_logp, mask), -20.0, 20.0))
    weight = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high).detach()
    on_mask = torch.where(mask.bool(), logp, torch.zeros_like(logp))  # (padding may hold -inf: 0 * inf is NaN)
    return _finish(-weight * adv * on_mask, ratio, weight != ratio.detach(), mask, agg, norm_constant, is_weights,
                   entropy)


POLICY_LOSS_FNS = {"ppo": policy_loss, "gspo": gspo_loss, "cispo": cispo_loss}
