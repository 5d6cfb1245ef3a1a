"""Packed (THD) micro-batches for the Megatron engine: sequences laid end to end, no padding between them.

A GRPO batch mixes responses of a few tokens with responses of tens of thousands; padding every row to the longest
would spend most of a step on padding. Instead each micro-batch is one flat token stream with the boundaries of its
sequences in ``cu_seqlens`` (attention stays within a sequence, RoPE restarts at each one), and micro-batches are
filled up to a **token budget** rather than a number of sequences, so a micro-batch of long sequences and one of short
ones cost about the same memory.

With context parallelism (CP) each sequence is padded to a multiple of 2 x CP and cut into 2 x CP chunks; CP rank
``k`` holds chunks ``k`` and ``2 CP - 1 - k`` (an early and a late one: causal attention then costs every rank about
the same). This is the layout of Transformer Engine's THD context parallelism and of Megatron's THD RoPE
(``_get_thd_freqs_on_this_cp_rank``), so the same packed batch feeds both.

Pure torch, no process groups: every rank of a data-parallel group computes the same plan from the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1.engines.sequence_packing import plan_micro_batches  # noqa: F401 -- (the plan both engines use)
from r1.types import TrainBatch


@dataclass
class PackedMicroBatch:
    """One micro-batch as a flat token stream. ``rows`` index the batch it came from; ``batch`` is those rows
    (trimmed), what the loss reads. Per token of the stream: its row in ``batch`` (-1 for padding) and position."""

    rows: torch.Tensor  # [n] long
    batch: TrainBatch
    input_ids: torch.Tensor  # [T] long
    cu_seqlens: torch.Tensor  # [n + 1] int32: sequence boundaries in the stream (each padded to the CP multiple)
    max_seqlen: int
    row_of: torch.Tensor  # [T] long
    pos_of: torch.Tensor  # [T] long
    predicts: torch.Tensor  # [T] bool: the token predicts a response token (the next token of its row)


def pack(batch: TrainBatch, rows: list[int], *, multiple: int = 1,
         device: torch.device | str = "cpu") -> PackedMicroBatch:
    """Pack ``rows`` of a right-padded (host) ``batch``, each sequence padded to a multiple of ``multiple`` (2 x CP),
    onto ``device`` (the model's: the stream, its index tensors and the rows the loss reads). Built on the host,
    copied once."""
    host = torch.device("cpu")
    index = torch.tensor(rows, dtype=torch.long, device=host)
    mb = batch.select(index).trimmed()
    lengths = mb.attention_mask.sum(dim=1).tolist()
    padded = [-(-n // multiple) * multiple for n in lengths]
    total = sum(padded)
    input_ids = torch.zeros(total, dtype=torch.long, device=host)
    row_of = torch.full((total,), -1, dtype=torch.long, device=host)
    pos_of = torch.zeros(total, dtype=torch.long, device=host)
    predicts = torch.zeros(total, dtype=torch.bool, device=host)
    start = 0
    for r, (n, p) in enumerate(zip(lengths, padded, strict=True)):
        input_ids[start : start + n] = mb.input_ids[r, :n]
        row_of[start : start + n] = r
        pos_of[start : start + p] = torch.arange(p, device=host)
        predicts[start : start + n - 1] = mb.response_mask[r, 1:n].bool()  # token t predicts token t + 1
        start += p
    cu_seqlens = torch.zeros(len(padded) + 1, dtype=torch.int32, device=host)
    cu_seqlens[1:] = torch.tensor(padded, dtype=torch.int32, device=host).cumsum(0)
    return PackedMicroBatch(index.to(device), mb.to(device), input_ids.to(device), cu_seqlens.to(device),
                            max(padded), row_of.to(device), pos_of.to(device), predicts.to(device))


def cp_local_indices(cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Stream positions held by CP rank ``cp_rank``: for every sequence, its chunks ``cp_rank`` and
    ``2 cp_size - 1 - cp_rank`` of ``2 cp_size``, in that order (the whole stream when ``cp_size`` is 1); on the
    device of ``cu_seqlens``."""
    device = cu_seqlens.device
    if cp_size == 1:
        return torch.arange(int(cu_seqlens[-1]), device=device)
    parts = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        chunk = (end - start) // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            parts.append(torch.arange(start + c * chunk, start + (c + 1) * chunk, device=device))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def sequence_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[T] the sequence each stream position belongs to (on the device of ``cu_seqlens``)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)
