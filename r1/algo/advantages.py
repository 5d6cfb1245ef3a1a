"""Group-relative advantages: GRPO's replacement for a learned value baseline."""

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


def filter_uniform_groups(rewards: torch.Tensor, group_size: int, *, atol: float = 0.0) -> torch.Tensor:
    """Boolean mask over groups: True where the group's rewards are not all equal (DAPO dynamic sampling).

    A group whose samples all got the same reward has zero advantage everywhere, so it adds no gradient, only
    dilutes the token-mean. Returns ``[num_prompts]``; expand with ``mask.repeat_interleave(group_size)``.
    """
    groups = _grouped(rewards.float(), group_size)
    spread = groups.max(dim=1).values - groups.min(dim=1).values
    return spread > atol
