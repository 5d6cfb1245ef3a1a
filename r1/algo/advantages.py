"""Advantages without a value model: GRPO's group-normalised reward, RLOO's leave-one-out baseline, REINFORCE++'s
batch normalisation. Each maps the outcome rewards of a batch (``[num_prompts * group_size]``, group order) to one
advantage per sample, broadcast over its tokens by the loss."""

from __future__ import annotations

import torch


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_prompts * group_size], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, std_normalize: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Advantage of each sample relative to the other samples of its prompt.

    ``rewards`` is ``[num_prompts * group_size]`` in group order (all samples of prompt 0, then prompt 1, ...).
    Returns ``(r - mean_g) / (std_g + eps)`` (GRPO, DeepSeekMath eq. 3) or, with ``std_normalize=False``,
    ``r - mean_g`` (Dr.GRPO, which drops the std to avoid up-weighting too-easy/too-hard prompts).
    The std is the unbiased sample std, as in the reference GRPO implementations; a group of one has zero advantage.
    """
    groups = _grouped(rewards.float(), group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if std_normalize and group_size > 1:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): each sample's reward minus the mean of the *other* samples of
    its prompt, ``r_i - (sum_g - r_i) / (G - 1) = G / (G - 1) * (r_i - mean_g)``. The baseline does not depend on
    the sample itself, so the estimate is unbiased (GRPO's group mean includes ``r_i``); no std scaling. A group of
    one has zero advantage."""
    groups = _grouped(rewards.float(), group_size)
    if group_size == 1:
        return torch.zeros_like(groups).reshape(-1)
    centred = groups - groups.mean(dim=1, keepdim=True)
    return (centred * (group_size / (group_size - 1))).reshape(-1)


def reinforce_pp_advantages(
    rewards: torch.Tensor, lengths: torch.Tensor, group_size: int, *, group_baseline: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """REINFORCE++ (Hu et al. 2025): advantages normalised over the whole *batch*, not within a prompt's group.

    With ``group_baseline`` (REINFORCE++-baseline, the paper's choice for reasoning tasks with several samples per
    prompt) each reward first loses its group's mean. Then every response token carries its sequence's value and
    the batch's tokens are whitened: ``(a - mean_tok) / sqrt(var_tok + eps)``, the mean and the unbiased variance
    taken over all ``sum(lengths)`` response tokens (a sequence weighs as many tokens as it has), as verl's
    ``masked_whiten`` does. ``lengths`` ``[B]``: each sample's number of response tokens. Returns ``[B]``.
    """
    values = _grouped(rewards.float(), group_size)
    if group_baseline:
        values = values - values.mean(dim=1, keepdim=True)
    values = values.reshape(-1)
    w = lengths.to(values.dtype)
    n = w.sum()
    if n < 2:
        raise ValueError(f"REINFORCE++ whitens over the batch's response tokens: {int(n)} is too few")
    mean = (values * w).sum() / n
    var = ((values - mean) ** 2 * w).sum() / n * (n / (n - 1))
    return (values - mean) * torch.rsqrt(var + eps)


def filter_uniform_groups(rewards: torch.Tensor, group_size: int, *, atol: float = 0.0) -> torch.Tensor:
    """Boolean mask over groups: True where the group's rewards are not all equal (DAPO dynamic sampling).

    A group whose samples all got the same reward has zero advantage everywhere, so it adds no gradient, only
    dilutes the token-mean. Returns ``[num_prompts]``; expand with ``mask.repeat_interleave(group_size)``.
    """
    groups = _grouped(rewards.float(), group_size)
    spread = groups.max(dim=1).values - groups.min(dim=1).values
    return spread > atol
