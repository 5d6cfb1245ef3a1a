"""RMSNorm for Megatron's local (non-Transformer-Engine) layer spec that also runs under sequence parallelism.

With sequence parallelism each tensor-parallel rank normalises only its slice of the sequence, so the gradient of
a norm's scale is partial on every rank and must be summed over TP. Megatron does that sum in
``finalize_model_grads`` for every parameter marked ``sequence_parallel``, which Transformer Engine's and Apex's
norms mark; the local spec's ``WrappedTorchNorm`` (torch's own norm, what runs without either: CPU, CI, GPU images
without TE) refuses sequence parallelism instead. This is torch's RMSNorm with that mark, nothing else.
"""

from __future__ import annotations

import torch


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization != "RMSNorm":
            raise ValueError(f"normalization={config.normalization!r}: r1's local layer spec has RMSNorm only "
                             "(Qwen2, Llama); install Transformer Engine for other norms")
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel
