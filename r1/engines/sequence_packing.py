"""Sequence packing for the HF train engine (``trainer.micro_batch_tokens``): a micro-batch's rows laid end to end
in one sequence, no padding between them.

SFT data mixes answers of a few tokens with long chains of thought; padded, a micro-batch costs its longest row times
its size. Packed, it costs its tokens. Micro-batches are filled up to a token budget (first-fit decreasing, the plan
the Megatron engine uses for its THD micro-batches), and inside a packed sequence each row attends to its own earlier
tokens only (a block-diagonal causal 4-D mask) at its own positions (position ids restart at 0), so every token sees
exactly what it sees in its own row: the loss gets the same tensors as without packing (up to floating-point order).
"""

from __future__ import annotations

import torch

from r1.engines.prompt_packing import PackedBatch
from r1.types import TrainBatch


def plan_micro_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Rows grouped so that each group's total length stays within ``token_budget`` (a longer row goes alone).

    First-fit decreasing: rows longest first, each into the first group with room; groups are then ordered by
    their first row and keep their rows in batch order, so the plan is deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for g, free in enumerate(room):
            if lengths[i] <= free:
                groups[g].append(i)
                room[g] -= lengths[i]
                break
        else:
            groups.append([i])
            room.append(token_budget - lengths[i])
    return sorted((sorted(g) for g in groups), key=lambda g: g[0])



def pack_sequences(batch: TrainBatch) -> PackedBatch:
    """All rows of ``batch`` (right-padded, as ``collate`` makes them) in one packed sequence."""
    lengths = batch.attention_mask.sum(dim=1).tolist()
    width = sum(lengths)
    ids = torch.zeros(1, width, dtype=batch.input_ids.dtype, device="cpu")
    positions = torch.zeros(1, width, dtype=torch.long, device="cpu")
    segment = torch.empty(width, dtype=torch.long, device="cpu")
    src_col, dst_row, dst_col = [], [], []
    offset = 0
    for row, n in enumerate(lengths):
        ids[0, offset:offset + n] = batch.input_ids[row, :n]
        positions[0, offset:offset + n] = torch.arange(n, device="cpu")
        segment[offset:offset + n] = row
        columns = batch.response_mask[row, :n].nonzero().flatten()
        columns = columns[columns > 0]  # (position 0 has no prediction)
        src_col.append(offset + columns - 1)  # token c is predicted by the token before it
        dst_row.append(torch.full((len(columns),), row, device="cpu"))
        dst_col.append(columns)
        offset += n
    mask = torch.ones(width, width, dtype=torch.bool, device="cpu").tril() & (segment[None, :] == segment[:, None])
    src_col_all = torch.cat(src_col)
    src = (torch.zeros_like(src_col_all), src_col_all)
    dst = (torch.cat(dst_row), torch.cat(dst_col))
    return PackedBatch(ids, positions, mask[None, None], src, dst, batch.input_ids[dst])
