"""The training pool's parallel layout: tensor x pipeline x context parallel, and data parallel over the rest.

Megatron's rank order is tp-cp-ep-dp-pp: the TP ranks of one model replica are adjacent (one node, NVLink), and
the ranks of one data-parallel group hold the same shard of the model. A batch is split over DP ranks only; the TP
and CP ranks of one DP group see the same sequences.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    cp: int = 1

    @property
    def model_parallel(self) -> int:
        """Ranks that hold one replica of the model."""
        return self.tp * self.pp * self.cp

    def dp(self, world_size: int) -> int:
        if world_size % self.model_parallel:
            raise ValueError(
                f"trainer.num_workers={world_size} is not a multiple of tensor x pipeline x context parallel "
                f"= {self.tp} x {self.pp} x {self.cp} = {self.model_parallel}: set trainer.num_workers to a "
                f"multiple of {self.model_parallel}, or change trainer.megatron's parallel sizes")
        return world_size // self.model_parallel


def initialize(layout: ParallelLayout, world_size: int, seed: int) -> None:
    """Megatron's process groups for ``layout`` on the already-initialized default group, and its RNG trackers."""
    from megatron.core import parallel_state, tensor_parallel

    layout.dp(world_size)  # a clear error before Megatron's assertion
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
    )
    # the tracker forks one RNG state per TP rank for weight init and dropout (a CPU tracker on CPU: cpu_compat)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
