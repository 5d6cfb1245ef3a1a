"""r1's weight-transfer backend for vLLM: bucketed broadcast over a gloo group, inside vLLM's own worker processes.

vLLM 0.32 updates weights in place through its weight-transfer API (``init_weight_transfer_engine`` ->
``start_weight_update`` -> ``update_weights`` -> ``finish_weight_update``); the transport is a pluggable
``WeightTransferEngine``. Its built-in ones are NCCL/CUDA-IPC only, so r1 registers ``r1_gloo``: the same bucketed
broadcast the trainer uses (``r1.distributed.bucketed_broadcast``), on CPU tensors, which works on every machine.

The sender is the rollout worker that owns the engine (group rank 0, holding the staged weights); vLLM's workers (one
per tensor-parallel rank) are ranks 1..TP and each loads the full HF state dict through ``model.load_weights``,
which shards it. ``start``/``finish`` run vLLM's layerwise reload, as its NCCL backend does, so fused or processed
parameters (qkv, gate_up) are rebuilt exactly as at load time.

Registration must happen in vLLM's worker processes too, which Python imports know nothing about: ``register`` is a
``vllm.general_plugins`` entry point (pyproject), and vLLM calls every general plugin in every process it starts.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKEND = "r1_gloo"


def register() -> None:
    """vLLM general plugin: make ``r1_gloo`` known to ``WeightTransferEngineFactory`` (idempotent)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, "r1.engines.vllm_transfer", "GlooWeightTransferEngine")


@dataclass
class GlooInitInfo:
    host: str
    port: int
    world_size: int  # 1 sender + tensor-parallel workers
    timeout_s: float = 600.0


@dataclass
class GlooUpdateInfo:
    version: int
    bucket_bytes: int
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]


def _engine_base():
    from vllm.distributed.weight_transfer.base import WeightTransferEngine

    return WeightTransferEngine


class GlooWeightTransferEngine(_engine_base()):
    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.group = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        from r1.distributed.bucketed_broadcast import BroadcastGroup

        rank = 1 + self.parallel_config.rank  # tensor/pipeline-parallel rank of this worker within its engine
        self.group = BroadcastGroup(init_info.host, init_info.port, rank, init_info.world_size,
                                    backend="gloo", timeout_s=init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        from r1.distributed.bucketed_broadcast import TensorSpec

        if self.group is None:
            raise RuntimeError("r1_gloo weight transfer used before init_weight_transfer_engine")
        manifest = [TensorSpec(n, tuple(s), d)
                    for n, d, s in zip(update_info.names, update_info.dtype_names, update_info.shapes)]
        arriving = self.group.receive(manifest, update_info.bucket_bytes, update_info.version)
        self.model.load_weights((name, t.to(self.device)) for name, t in arriving)

    def update_weights(self, update_info: dict) -> None:
        # the base class ends with torch.accelerator.synchronize(), which has nothing to do on CPU tensors
        self.receive_weights(self.parse_update_info(update_info))

    def shutdown(self) -> None:
        self.group = None


def update_info(manifest, version: int, bucket_bytes: int) -> dict:
    """What ``update_weights`` gets for a manifest (``r1.distributed.bucketed_broadcast.TensorSpec`` list)."""
    return {
        "version": version, "bucket_bytes": bucket_bytes, "names": [s.name for s in manifest],
        "dtype_names": [s.dtype for s in manifest], "shapes": [list(s.shape) for s in manifest],
    }

