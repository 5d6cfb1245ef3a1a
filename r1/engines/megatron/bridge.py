"""Hugging Face <-> Megatron-core weights through mbridge 0.15.1 (a kept library, not hand-written mappings).

``load`` builds the Megatron model of an HF checkpoint for the current TP/PP layout, every rank reading only what it
holds (tensor-parallel rank 0 reads, the others receive their shards). ``export`` streams the policy back under HF
names, one full tensor at a time (gathered across TP, broadcast across PP): what the weight sync sends and what an HF
export writes, without a whole-model copy on any rank. Every rank of the model-parallel group must iterate it.

mbridge needs four corrections here, applied once per process by ``_patch_mbridge``:
- without Transformer Engine (CPU; GPU images without it) the layer spec is Megatron's local one, whose norms are
  separate modules (``input_layernorm``, ``pre_mlp_layernorm``) rather than fused into the linear layers, and whose
  core attention is ``r1.engines.megatron.attention`` (packed sequences and context parallelism, which Megatron's
  local attention refuses); its norms are ``r1.engines.megatron.norm``'s (sequence parallelism, which torch's
  refuses);
- mbridge mutates the class-level ``_DIRECT_MAPPING`` when it sees tied embeddings, so converting a tied model and
  then an untied one in one process would map ``lm_head`` from ``embed_tokens``: each bridge gets its own copy;
- transformers 5 keeps ``rope_theta`` inside ``rope_parameters``;
- the vocabulary is padded to a multiple of the TP size (Megatron splits it evenly); ``vocab_size`` says where the
  real vocabulary ends, and log-probs mask the padding (``r1.engines.megatron.logprobs``).
"""

from __future__ import annotations

import importlib.util
import threading

import torch

_patched = False
_lock = threading.Lock()


def has_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def _patch_mbridge() -> None:
    global _patched
    with _lock:
        if _patched:
            return
        from mbridge.core.bridge import Bridge
        from mbridge.core.llm_bridge import LLMBridge
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        if not has_transformer_engine():
            from r1.engines.megatron.attention import PackedCoreAttention
            from r1.engines.megatron.norm import SequenceParallelRMSNorm

            def local_spec(self, vp_stage=None):
                self.has_vp_stage = True
                spec = get_gpt_decoder_block_spec(self.config, use_transformer_engine=False,
                                                  normalization="RMSNorm", vp_stage=vp_stage)
                for layer in spec.layer_specs:  # packed sequences and context parallelism (see attention.py)
                    layer.submodules.self_attention.submodules.core_attention = PackedCoreAttention
                    layer.submodules.input_layernorm = SequenceParallelRMSNorm
                    layer.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
                spec.layer_norm = SequenceParallelRMSNorm
                return spec

            to_hf = Bridge._weight_name_mapping_mcore_to_hf

            def local_names_to_hf(self, name):
                name = name.replace(".input_layernorm.weight", ".self_attention.linear_qkv.layer_norm_weight")
                return to_hf(self, name.replace(".pre_mlp_layernorm.weight", ".mlp.linear_fc1.layer_norm_weight"))

            LLMBridge._get_transformer_layer_spec = local_spec
            Bridge._weight_name_mapping_mcore_to_hf = local_names_to_hf

        init = Bridge.__init__

        def init_with_own_mapping(self, *args, **kwargs):
            self._DIRECT_MAPPING = dict(type(self)._DIRECT_MAPPING)
            init(self, *args, **kwargs)

        Bridge.__init__ = init_with_own_mapping
        _patched = True


def make_bridge(hf_dir: str, *, tp_size: int, params_dtype: torch.dtype, sequence_parallel: bool = False,
                extra: dict | None = None):
    """The mbridge ``Bridge`` of an HF checkpoint, configured for this process's parallel layout
    (``sequence_parallel`` only with ``tp_size > 1``: Megatron refuses it without tensor parallelism)."""
    _patch_mbridge()
    from mbridge import AutoBridge

    bridge = AutoBridge.from_pretrained(hf_dir, dtype=params_dtype, make_vocab_size_divisible_by=tp_size)
    hf = bridge.hf_config
    if getattr(hf, "rope_theta", None) is None:
        hf.rope_theta = (getattr(hf, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    args = {"sequence_parallel": sequence_parallel and tp_size > 1,
            "use_cpu_initialization": not torch.cuda.is_available()}
    bridge.set_extra_args(**args, **(extra or {}))
    return bridge


def load(bridge, hf_dir: str, *, bf16: bool):
    """The Megatron model chunks of this rank (one per virtual pipeline stage), with the HF weights loaded."""
    cpu = not torch.cuda.is_available()
    # use_torch_fsdp2 + use_cpu_initialization is the flag pair with which megatron's get_model skips .cuda()
    # (there is no FSDP wrap without wrap_with_ddp)
    return bridge.get_model(weight_path=hf_dir, bf16=bf16, fp16=False, wrap_with_ddp=False,
                            use_torch_fsdp2=cpu, use_cpu_initialization=cpu)


def export(bridge, chunks):
    """(HF name, full tensor) for every weight, in the HF model's order of appearance across stages; padding rows
    of the vocabulary removed. All ranks of the model-parallel group must iterate it to the end."""
    return bridge.export_weights(chunks)
