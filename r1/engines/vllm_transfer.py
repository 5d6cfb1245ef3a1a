"""r1's weight-transfer backend for vLLM: vLLM's workers are members of the trainer's sync group (one hop).

vLLM 0.32 updates weights in place through its weight-transfer API (``init_weight_transfer_engine`` ->
``start_weight_update`` -> ``update_weights`` -> ``finish_weight_update``); the transport is a pluggable
``WeightTransferEngine``. r1 registers ``r1_sync``: at init, each of vLLM's workers (one per tensor-parallel rank)
joins the trainer's sync group as rank ``first_rank + tp_rank`` and starts a ``StagedReceiver``, which receives
every version the trainer broadcasts - NCCL into the GPU, then pinned host memory; gloo on CPU - on a thread of its
own while the engine goes on generating. ``update_weights`` then only *loads* a staged version (``{"version": v}``):
``model.load_weights`` on the staged host tensors, which shards them, inside vLLM's layerwise reload
(``start``/``finish``), as its NCCL backend does, so fused or processed parameters (qkv, gate_up) are rebuilt exactly
as at load time.

Why not vLLM's built-in NCCL engine: it receives inside ``update_weights``, i.e. while generation is paused, and
would have to be called when the trainer sends - but a version must wait for its requests (the version rules) and
the trainer cannot hold it back. Receiving in the background and loading on cue keeps both.

Registration must happen in vLLM's worker processes too, which Python imports know nothing about: ``register`` is a
``vllm.general_plugins`` entry point (pyproject), and vLLM calls every general plugin in every process it starts.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKEND = "r1_sync"


def register() -> None:
    """vLLM general plugin: make ``r1_sync`` known to ``WeightTransferEngineFactory`` (idempotent)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, "r1.engines.vllm_transfer", "StagedWeightTransferEngine")


@dataclass
class SyncInitInfo:
    spec: dict  # r1.distributed.staged_receiver.SyncSpec.as_dict()


@dataclass
class LoadInfo:
    version: int  # load this staged version
    timeout_s: float = 600.0


def _engine_base():
    from vllm.distributed.weight_transfer.base import WeightTransferEngine

    return WeightTransferEngine


class StagedWeightTransferEngine(_engine_base()):
    init_info_cls = SyncInitInfo
    update_info_cls = LoadInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.receiver = None
        self._release = None  # gives the loaded version's staging memory back, once the reload is finished
        self.tied = bool(getattr(vllm_config.model_config.hf_config, "tie_word_embeddings", False))

    def init_transfer_engine(self, init_info: SyncInitInfo) -> None:
        """Join (a re-formed) sync group; returns at once, the receiver joins on its own thread."""
        import torch

        from r1.distributed.staged_receiver import StagedReceiver, SyncSpec

        spec = SyncSpec.from_dict(init_info.spec)
        device = torch.device(self.device)
        self.receiver = StagedReceiver(spec, spec.first_rank + self.parallel_config.rank,
                                       backend="nccl" if device.type == "cuda" else "gloo", device=device,
                                       previous=self.receiver)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        if self._release is not None:
            # only now: the reload processes some layers (a padded vocabulary's) from the staged tensors here
            self._release()
            self._release = None

    def receive_weights(self, update_info: LoadInfo) -> None:
        if self.receiver is None:
            raise RuntimeError("r1_sync weight update before init_weight_transfer_engine")
        weights, self._release = self.receiver.take(update_info.version, update_info.timeout_s)
        if self.tied and "lm_head.weight" not in {n for n, _ in weights}:
            # a trainer's named_parameters() lists a tied weight once; vLLM's layerwise reload completes a layer only
            # when each of its weights has arrived, the tied lm_head included
            weights = [*weights, ("lm_head.weight", dict(weights)["model.embed_tokens.weight"])]
        # host tensors, as vLLM's own loader passes a checkpoint's: each TP rank's loaders narrow them to its shard
        # before the copy to the GPU, so only the shard crosses PCIe (and the reload buffers nothing on the device)
        self.model.load_weights(iter(weights))

    def update_weights(self, update_info: dict) -> None:
        self.receive_weights(self.parse_update_info(update_info))

    def shutdown(self) -> None:
        if self.receiver is not None:
            self.receiver.retire()
