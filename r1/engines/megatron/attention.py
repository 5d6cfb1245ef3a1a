"""Core attention over packed (THD) sequences with context parallelism, for Megatron without Transformer Engine.

On GPU clusters Megatron's Transformer Engine attention handles packed sequences and context parallelism (ring or
all-gather of keys and values, flash kernels). Megatron's own local attention (``DotProductAttention``, what runs
where Transformer Engine is absent: CPU, laptops, CI) refuses both. This module is the local spec's replacement: the
same inputs and outputs as TE's THD attention, computed with ``torch.nn.functional.scaled_dot_product_attention``.

Context parallelism by all-gather: every CP rank gathers the keys and values of all ranks (Megatron's "all_gather"
CP communication type) and attends from its own queries with a mask built from where each token sits in its
sequence (``r1.engines.megatron.packing``): not later in the same sequence. Each sequence is one row of a padded
batch. Without CP that row is plain causal attention (``is_causal``, no mask tensor), which torch runs with its flash
or memory-efficient kernels on GPU: memory linear in the sequence length, though micro-batches pad to their longest
sequence. With CP the mask is explicit (torch's math kernel: the scores of a row at once): right for CPU-sized runs;
GPU runs at long context use Transformer Engine's kernels where it is installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from r1.engines.megatron.context_parallel import all_gather
from r1.engines.megatron.packing import cp_local_indices, sequence_ids


class PackedCoreAttention(MegatronModule):
    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        from megatron.core import parallel_state

        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.heads = config.num_attention_heads // tp
        self.kv_heads = config.num_query_groups // tp
        head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
        self.cp_group = parallel_state.get_context_parallel_group() if config.context_parallel_size > 1 else None
        self.cp_size = config.context_parallel_size
        self.cp_rank = parallel_state.get_context_parallel_rank() if self.cp_group is not None else 0

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [t, heads, d], key/value [t, kv_heads, d] (this rank's tokens of the packed stream) -> [t, heads*d];
        or, unpacked, [s, b, heads, d] -> [s, b, heads*d] as Megatron's own local attention."""
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            return self._unpacked(query, key, value, attention_mask)
        cu_seqlens = packed_seq_params.cu_seqlens_q  # (on the model's device, as every index below)
        local = cp_local_indices(cu_seqlens, self.cp_size, self.cp_rank)
        if self.cp_group is not None:
            key, value = all_gather(key, self.cp_group), all_gather(value, self.cp_group)
            everywhere = torch.cat([cp_local_indices(cu_seqlens, self.cp_size, r) for r in range(self.cp_size)])
        else:
            everywhere = local
        # One row per sequence (its queries here, its keys from every CP rank), so the work is the sum of the
        # squared sequence lengths, not the square of the stream's length: attention never crosses sequences.
        seq = sequence_ids(cu_seqlens)
        q_rows, q_slots, q_width = _rows(seq[local])
        k_rows, k_slots, k_width = _rows(seq[everywhere])
        n = len(cu_seqlens) - 1

        def batched(x, rows, slots, width):
            out = x.new_zeros(n, width, *x.shape[1:])
            return out.index_put((rows, slots), x).transpose(1, 2)  # [n, heads, width, d]

        q = batched(query, q_rows, q_slots, q_width)
        k, v = batched(key, k_rows, k_slots, k_width), batched(value, k_rows, k_slots, k_width)
        if self.heads != self.kv_heads:  # (the fused kernels take as many key/value heads as query heads)
            k, v = (x.repeat_interleave(self.heads // self.kv_heads, dim=1) for x in (k, v))
        if self.cp_group is None:
            # each sequence is a row from its first token: causal attention within the row, no mask tensor (flash
            # and memory-efficient kernels on GPU; no [rows x W x W] scores). Padding keys sit after every real
            # token, so no real query sees one; padding queries' outputs are dropped below
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            device = local.device
            q_at = torch.full((n, q_width), -1, dtype=torch.long, device=device).index_put((q_rows, q_slots), local)
            k_at = torch.full((n, k_width), 2**62, dtype=torch.long, device=device).index_put(
                (k_rows, k_slots), everywhere)
            # stream positions grow along a sequence: a key is visible if it is not later than the query; padding key
            # slots (2^62) never are; a padding query slot (-1) attends to everything (finite, its output dropped)
            mask = (k_at[:, None, :] <= q_at[:, :, None]) | (q_at[:, :, None] < 0)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=self.scale)
        return out.transpose(1, 2)[q_rows, q_slots].reshape(query.shape[0], -1)


    def _unpacked(self, query, key, value, attention_mask):
        """Megatron's [s, b, heads, d] layout: causal, and ``attention_mask`` (True = masked) where given."""
        if self.cp_group is not None:
            raise ValueError("context parallelism needs packed sequences (packed_seq_params, THD)")
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        keep = None if attention_mask is None else ~attention_mask.to(torch.bool)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=keep is None, scale=self.scale,
                                             enable_gqa=self.heads != self.kv_heads)
        return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)


def _rows(seq_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For tokens listed by sequence id (each sequence's tokens in stream order): each token's row (its sequence),
    its slot within the row, and the widest row."""
    counts = torch.bincount(seq_of) if len(seq_of) else torch.zeros(0, dtype=torch.long, device=seq_of.device)
    starts = torch.cumsum(counts, 0) - counts
    order = torch.argsort(seq_of, stable=True)
    slots = torch.empty_like(seq_of)
    slots[order] = torch.arange(len(seq_of), device=seq_of.device) - starts[seq_of[order]]
    return seq_of, slots, int(counts.max()) if len(counts) else 0
