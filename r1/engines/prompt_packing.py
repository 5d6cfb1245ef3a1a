"""Shared-prompt packing: the G responses of a GRPO group in one sequence with their prompt, which is computed once.

A GRPO batch holds G samples of every prompt, and the R1-Zero template makes prompts long: in the default experiment
the prompt is ~75% of every row the trainer reads. Packed, a group becomes one sequence

    [prompt | response 1 | response 2 | ... | response G]

in which every response attends to the prompt and to its own earlier tokens only (a 4-D attention mask) and
continues the prompt's positions (explicit position ids): each response sees exactly what it sees in its own row.
A response token's log-prob is read at the position that predicts it and put back where the unpacked batch has it,
so a loss sees the same tensors as without packing; only the floating-point order of some sums differs. (Each
response carries its own copy of the prompt's last token, which predicts its first token: no position serves two
responses, so no gradient is summed in a run-dependent order, and the update is reproducible bit for bit.)

A group is packed when its prompt is longer than its longest response. Past that point the packed row's attention
(quadratic in its length) costs more than the prompt tokens it saves: with 32K-token responses nothing is packed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1.types import TrainBatch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [R, W] packed rows, right-padded
    position_ids: torch.Tensor  # [R, W]
    attention_mask: torch.Tensor  # [R, 1, W, W] bool: True where a query may attend a key
    src: tuple[torch.Tensor, torch.Tensor]  # (packed row, column) of the position predicting each response token
    dst: tuple[torch.Tensor, torch.Tensor]  # (batch row, column) of that token
    targets: torch.Tensor  # [N] the response tokens


def pack_by_prompt(batch: TrainBatch) -> PackedBatch | None:
    """The batch's rows packed by shared prompt; None when no group would be packed (nothing to save)."""
    ids, response = batch.input_ids, batch.response_mask.bool()
    lengths = batch.attention_mask.sum(dim=1).tolist()
    groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for row in range(len(batch)):
        columns = response[row].nonzero().flatten()
        if len(columns) == 0:
            continue  # no response token: nothing of this row reaches a loss
        start = int(columns[0])
        if start == 0 or len(columns) != lengths[row] - start or int(columns[-1]) != lengths[row] - 1:
            return None  # not the layout collate makes (prompt, then the response up to the row's end)
        groups.setdefault(tuple(ids[row, :start].tolist()), []).append((row, start))

    sequences: list[list[tuple[int, int, int]]] = []  # per packed row: (batch row, first column, end) of each part
    for rows in groups.values():
        prompt_len = rows[0][1]
        if len(rows) > 1 and prompt_len > max(lengths[r] - s for r, s in rows):
            sequences.append([(row, start, lengths[row]) for row, start in rows])
        else:
            sequences.extend([[(row, start, lengths[row])] for row, start in rows])
    if len(sequences) == sum(len(rows) for rows in groups.values()):
        return None

    # [prompt minus its last token | last token, response 1 | last token, response 2 | ...]: each response's part
    # starts with its own copy of the prompt's last token, so every position predicts exactly one token. (Read from
    # one shared position, the first tokens' gradients would be summed into it by a CPU kernel whose order varies.)
    width = max(s[0][1] - 1 + sum(end - start + 1 for _, start, end in s) for s in sequences)
    packed = torch.zeros(len(sequences), width, dtype=ids.dtype, device="cpu")
    positions = torch.zeros(len(sequences), width, dtype=torch.long, device="cpu")
    segment = torch.full((len(sequences), width), -1, dtype=torch.long, device="cpu")  # 0 prompt, k response k, -1 padding
    src_row, src_col, dst_row, dst_col = [], [], [], []
    for p, parts in enumerate(sequences):
        first_row, prompt_len, _ = parts[0]
        shared = prompt_len - 1
        packed[p, :shared] = ids[first_row, :shared]
        positions[p, :shared] = torch.arange(shared, device="cpu")
        segment[p, :shared] = 0
        offset = shared
        for k, (row, start, end) in enumerate(parts, start=1):
            n = end - start
            packed[p, offset:offset + n + 1] = ids[row, start - 1:end]
            positions[p, offset:offset + n + 1] = torch.arange(start - 1, end, device="cpu")
            segment[p, offset:offset + n + 1] = k
            src_col.append(torch.arange(offset, offset + n, device="cpu"))  # token j is predicted by the token before it
            src_row.append(torch.full((n,), p, device="cpu"))
            dst_row.append(torch.full((n,), row, device="cpu"))
            dst_col.append(torch.arange(start, end, device="cpu"))
            offset += n + 1

    causal = torch.ones(width, width, dtype=torch.bool, device="cpu").tril()
    key_visible = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])
    mask = causal & key_visible & (segment >= 0)[:, None, :]
    mask |= torch.eye(width, dtype=torch.bool, device="cpu")  # a padding query attends to itself: no row is fully masked
    src = (torch.cat(src_row), torch.cat(src_col))
    dst = (torch.cat(dst_row), torch.cat(dst_col))
    return PackedBatch(packed, positions, mask[:, None], src, dst, ids[dst])
