"""Gathering activations over the context-parallel group, with the gradient flowing back to each rank's shard.

Gloo has no reduce-scatter, which is the backward of an all-gather in ``torch.distributed.nn``; an all-reduce of the
gathered gradient followed by taking this rank's slice is the same sum and runs on gloo and NCCL alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # every rank's gradient w.r.t. every shard, summed
        return grad.chunk(dist.get_world_size(ctx.group), dim=0)[dist.get_rank(ctx.group)], None


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` of every rank of ``group`` concatenated along dim 0 in rank order (``x`` itself for one rank);
    differentiable: each rank's ``x`` receives the sum of all ranks' gradients for it."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllGather.apply(x, group)
