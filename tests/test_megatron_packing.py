"""Packed micro-batches (r1.engines.megatron.packing): the token budget, the stream layout and the context-parallel
split, against hand-computed values."""

from __future__ import annotations

import torch

from r1.engines.megatron.packing import cp_local_indices, pack, plan_micro_batches, sequence_ids
from r1.types import TrainBatch


def test_micro_batches_fill_a_token_budget_and_a_long_row_goes_alone():
    lengths = [9, 3, 30, 7, 5, 8, 2]
    plan = plan_micro_batches(lengths, token_budget=16)
    # first-fit decreasing: 30 alone; 9+7 = 16; 8+5+3 = 16; 2 fits nowhere else
    assert plan == [[0, 3], [1, 4, 5], [2], [6]]
    assert sorted(i for g in plan for i in g) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 16 for g in plan if len(g) > 1)
    assert plan_micro_batches(lengths, token_budget=1000) == [list(range(len(lengths)))]


def _batch() -> TrainBatch:
    ids = torch.tensor([[11, 12, 13, 14, 0], [21, 22, 23, 24, 25], [31, 32, 33, 0, 0]])
    attn = (ids > 0).long()
    resp = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.float)
    return TrainBatch(ids, attn, resp, torch.zeros(3))


def test_a_packed_stream_holds_each_row_once_with_its_boundaries_and_predicting_positions():
    mb = pack(_batch(), [2, 0])  # rows 2 then 0: lengths 3 and 4
    assert mb.input_ids.tolist() == [31, 32, 33, 11, 12, 13, 14]
    assert mb.cu_seqlens.tolist() == [0, 3, 7] and mb.max_seqlen == 4
    assert mb.row_of.tolist() == [0, 0, 0, 1, 1, 1, 1] and mb.pos_of.tolist() == [0, 1, 2, 0, 1, 2, 3]
    # a position predicts the next token of its row where that token is a response token
    assert mb.predicts.tolist() == [True, True, False, False, True, True, False]
    assert mb.batch.input_ids.tolist() == [[31, 32, 33, 0], [11, 12, 13, 14]]  # the rows, trimmed


def test_context_parallel_ranks_hold_an_early_and_a_late_chunk_of_every_sequence():
    mb = pack(_batch(), [0, 1], multiple=4)  # CP = 2: each sequence padded to a multiple of 4 (4 and 8 tokens)
    assert mb.cu_seqlens.tolist() == [0, 4, 12]
    assert mb.row_of.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, -1, -1, -1]
    # sequence 0 = chunks of 1 token [0][1][2][3]; sequence 1 = chunks of 2 tokens [4,5][6,7][8,9][10,11]
    assert cp_local_indices(mb.cu_seqlens, 2, 0).tolist() == [0, 3, 4, 5, 10, 11]
    assert cp_local_indices(mb.cu_seqlens, 2, 1).tolist() == [1, 2, 6, 7, 8, 9]
    assert cp_local_indices(mb.cu_seqlens, 1, 0).tolist() == list(range(12))
    assert sequence_ids(mb.cu_seqlens).tolist() == [0] * 4 + [1] * 8
