"""Core attention over packed (THD) sequences with context parallelism, for Megatron without Transformer Engine.

On GPU clusters Megatron's Transformer Engine attention handles packed sequences and context parallelism (ring or
all-gather of keys and values, flash kernels). Megatron's own local attention (``DotProductAttention``, what runs
where Transformer Engine is absent: CPU, laptops, CI) refuses both. This module is the local spec's replacement: the
same inputs and outputs as TE's THD attention, computed with ``torch.nn.functional.scaled_dot_product_attention``.

Context parallelism by all-gather: every CP rank gathers the keys and values of all ranks (Megatron's "all_gather"
CP communication type) and attends from its own queries with a mask built from where each token sits in its
sequence (``r1.engines.megatron.packing``): same sequence, not later. The mask is [local tokens x all tokens], so
memory is quadratic in the micro-batch's tokens: meant for CPU-sized runs; GPU runs use Transformer Engine.
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
        """query [t, heads, d], key/value [t, kv_heads, d] (this rank's tokens of the packed stream) -> [t, heads*d]."""
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            raise ValueError("PackedCoreAttention takes packed (THD) sequences: pass packed_seq_params")
        cu_seqlens = packed_seq_params.cu_seqlens_q.cpu()
        local = cp_local_indices(cu_seqlens, self.cp_size, self.cp_rank)
        if self.cp_group is not None:
            key, value = all_gather(key, self.cp_group), all_gather(value, self.cp_group)
            everywhere = torch.cat([cp_local_indices(cu_seqlens, self.cp_size, r) for r in range(self.cp_size)])
        else:
            everywhere = local
        seq = sequence_ids(cu_seqlens)
        # stream positions grow along each sequence: "not later" is an index comparison within one sequence
        mask = (seq[local][:, None] == seq[everywhere][None, :]) & (everywhere[None, :] <= local[:, None])
        out = F.scaled_dot_product_attention(
            query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), attn_mask=mask.to(query.device),
            scale=self.scale, enable_gqa=self.heads != self.kv_heads)
        return out.transpose(0, 1).reshape(query.shape[0], -1)
