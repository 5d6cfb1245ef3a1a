"""Train engine on Megatron-core: TP x PP x CP model parallelism, data parallel over the rest, distributed optimizer.

The GRPO step is the HF engine's, expressed in Megatron's terms: the same ``LossFn`` from ``r1.algo`` (no second
copy of the algorithm), the same weighting of micro-batches by ``loss_fn.units`` so the update does not depend on
how a mini-batch was split, run through Megatron's forward-backward schedule (pipeline schedules at PP > 1). The
model returns hidden states; log-probs are projected from them vocab-parallel and in chunks
(``r1.engines.megatron.logprobs``), so the [tokens x vocab] logits never exist whole.

Micro-batches are packed token streams filled up to a token budget (``packing``). With context parallelism each
rank holds two chunks of every sequence and attention gathers the keys and values of the others (Transformer
Engine on GPU, ``attention`` without it); the log-probs of all CP ranks are gathered, differentiably, so every CP
rank computes the same loss. Each rank's tokens then get CP times their gradient (one copy per rank that computed
the loss); Megatron's averaging of gradients over DP x CP divides that out again (see ``train_step``'s scale).

Every rank of the training pool builds one; all of them must make the same calls in the same order (each call is
collective over the model-parallel and data-parallel groups).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from r1.engines.megatron import bridge as mbridge
from r1.engines.megatron import cpu_compat
from r1.engines.megatron.context_parallel import all_gather
from r1.engines.megatron.hf_export import write_hf_dir
from r1.engines.megatron.layout import ParallelLayout, initialize
from r1.engines.megatron.logprobs import vocab_parallel_logprobs
from r1.engines.megatron.packing import PackedMicroBatch, cp_local_indices, pack, plan_micro_batches
from r1.engines.megatron.safe_checkpoint import check_metadata, weights_only_loads
from r1.engines.protocols import LossFn
from r1.types import TrainBatch

# activation recomputation (Megatron TransformerConfig fields): "selective" recomputes the core attention in the
# backward pass (the [tokens x tokens] part), "full" each whole transformer layer (only layer inputs are kept)
RECOMPUTE = {
    "none": {},
    "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}


def _returns_hidden_states(model, sequence_parallel: bool) -> None:
    """The GPT model's output layer passes its input through: the log-probs project the hidden states themselves.
    (Only the last pipeline stage has one.) Under sequence parallelism each TP rank holds a slice of the sequence,
    gathered here as the output layer would; its backward takes each rank's slice of the gradient, which the
    log-probs' own TP all-reduce has already made whole (``logprobs._chunk``)."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    def forward(hidden, weight=None, runtime_gather_output=None):
        if sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return hidden, None

    if model.post_process:
        model.output_layer.forward = forward


def _output_weight(model) -> torch.Tensor:
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def _restore_adam_states_by_source_keys() -> None:
    """megatron-core 0.16.1 with torch's Adam (no Apex / Transformer Engine): resuming a "fully_reshardable"
    checkpoint copies every key of a parameter's optimizer state from the checkpoint, ``step`` included, but the
    checkpoint's per-parameter tensors have no ``step`` (it is restored once, from the common state, just before),
    so the copy raises ``KeyError: 'step'``. Copy the keys the checkpoint has instead. Idempotent."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "r1_patched", False):
        return

    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destination = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            destination[key].copy_(value)

    set_states.r1_patched = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _check_heads_split(hf_config, tp: int) -> None:
    """Tensor parallelism splits attention heads (and KV heads) evenly; say so before Megatron asserts."""
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads % tp or kv_heads % tp:
        raise ValueError(
            f"trainer.megatron.tensor_parallel={tp} does not divide the model's {heads} attention heads and "
            f"{kv_heads} key-value heads: choose a tensor_parallel size that divides both")


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


class MegatronTrainEngine:
    def __init__(
        self,
        model_path: str,
        *,
        layout: ParallelLayout,
        lr: float,
        betas: tuple[float, float],
        weight_decay: float,
        warmup_steps: int,
        grad_clip: float,
        micro_batch_tokens: int,
        with_reference: bool,
        dtype: str = "float32",
        seed: int = 0,
        logprob_chunk_tokens: int = 4096,
        recompute: str = "none",
        sequence_parallel: bool = True,
        overlap_grad_reduce: bool = True,
        grad_reduce_in_fp32: bool = False,
    ):
        from megatron.core import parallel_state
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from transformers import AutoConfig

        _check_heads_split(AutoConfig.from_pretrained(model_path), layout.tp)
        if recompute not in RECOMPUTE:
            raise ValueError(f"recompute={recompute!r}: choose one of {list(RECOMPUTE)}")
        cpu_compat.apply()
        if not dist.is_initialized():  # a single rank still needs Megatron's process groups
            dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
        self.layout, self.model_path = layout, model_path
        initialize(layout, dist.get_world_size(), seed)
        self.ps = parallel_state
        self.dp = layout.dp(dist.get_world_size())
        self.data_parallel_size, self.data_parallel_rank = self.dp, parallel_state.get_data_parallel_rank()
        self.cp_group = parallel_state.get_context_parallel_group() if layout.cp > 1 else None
        self.cp_rank = parallel_state.get_context_parallel_rank()
        self.collective = True  # the model is sharded over TP x PP x CP: export, save and load involve every rank
        self.bf16 = dtype == "bfloat16"
        self.serving_dtype = getattr(torch, dtype)
        self.sequence_parallel = sequence_parallel and layout.tp > 1
        self.bridge = mbridge.make_bridge(model_path, tp_size=layout.tp,
                                          params_dtype=torch.bfloat16 if self.bf16 else torch.float32,
                                          sequence_parallel=self.sequence_parallel, extra=RECOMPUTE[recompute])
        cpu = not torch.cuda.is_available()
        # every tensor of a step is made on the model's device (the host batch is copied once, in ``pack``)
        self.device = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
        # Gradients are reduce-scattered over DP bucket by bucket as the backward pass produces them (overlapped with
        # the rest of it), in the parameters' dtype unless grad_reduce_in_fp32 (the buffer they accumulate in over
        # micro-batches has that dtype too). Parameters are all-gathered after the step, not overlapped with the next
        # forward: weights are exported right after a step (the push), and must be whole by then.
        self.chunks = self.bridge.get_model(
            weight_path=model_path, bf16=self.bf16, fp16=False, wrap_with_ddp=True, use_cpu_initialization=cpu,
            ddp_config={"use_distributed_optimizer": True, "grad_reduce_in_fp32": grad_reduce_in_fp32,
                        "overlap_grad_reduce": overlap_grad_reduce, "overlap_param_gather": False},
        )
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.utils import get_model_config

        # what Megatron-LM's training loop sets up: after the last micro-batch, the schedule reduces gradients over
        # DP (and the tied embedding's over the first and last pipeline stage); without it each rank steps alone
        config = get_model_config(self.chunks[0])
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = [c.no_sync for c in self.chunks] if len(self.chunks) > 1 else self.chunks[0].no_sync
        self.reference = mbridge.load(self.bridge, model_path, bf16=self.bf16) if with_reference else None
        for chunk in self.chunks + (self.reference or []):
            _returns_hidden_states(_unwrap(chunk), self.sequence_parallel)
        for chunk in self.reference or []:
            chunk.eval().requires_grad_(False)
        self.lr, self.weight_decay, self.warmup_steps, self.steps_done = lr, weight_decay, warmup_steps, 0
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=betas[0],
                            adam_beta2=betas[1], adam_eps=1e-8, clip_grad=grad_clip, bf16=self.bf16,
                            params_dtype=torch.float32, use_distributed_optimizer=True),
            self.chunks,
        )
        self.micro_batch_tokens = micro_batch_tokens
        self.logprob_chunk_tokens = logprob_chunk_tokens
        self.vocab_size = self.bridge.vocab_size

    # --- forward passes ---------------------------------------------------------------------------------------
    def _micro_batches(self, batch: TrainBatch) -> list[PackedMicroBatch]:
        """Rows packed into micro-batches of at most ``micro_batch_tokens`` tokens (a longer row goes alone), each
        sequence padded to a multiple of 2 x CP (the context-parallel split), times TP under sequence parallelism
        (each TP rank's slice of a CP rank's stream)."""
        lengths = batch.attention_mask.sum(dim=1).tolist()
        multiple = 2 * self.layout.cp if self.layout.cp > 1 else 1
        if self.sequence_parallel:
            multiple *= self.layout.tp
        return [pack(batch, rows, multiple=multiple, device=self.device)
                for rows in plan_micro_batches(lengths, self.micro_batch_tokens)]

    def _response_logprobs(self, chunk, mb: PackedMicroBatch, hidden: torch.Tensor, temperature: float,
                           with_entropy: bool):
        """[B, L] log-probs (and entropies) of ``mb.batch`` where its response mask is 1, zero elsewhere, from this
        rank's hidden states [t, H]: only the positions that predict a response token are projected to the
        vocabulary; with CP the values of all ranks are gathered (differentiably), so every CP rank sees them all."""
        local = cp_local_indices(mb.cu_seqlens, self.layout.cp, self.cp_rank)
        picks = mb.predicts[local].nonzero(as_tuple=True)[0]
        logp, entropy = vocab_parallel_logprobs(
            hidden[picks], _output_weight(_unwrap(chunk)), mb.input_ids[local[picks] + 1],
            vocab_size=self.vocab_size, temperature=temperature, chunk_tokens=self.logprob_chunk_tokens,
            with_entropy=with_entropy)
        everywhere = torch.cat([cp_local_indices(mb.cu_seqlens, self.layout.cp, r) for r in range(self.layout.cp)])
        at = everywhere[mb.predicts[everywhere]]  # stream positions whose value arrives, in gathered order
        targets = (mb.row_of[at], mb.pos_of[at] + 1)

        # Every CP rank must run the same collectives backwards (each layer's key/value gather, this gather): the
        # values stay tied to all of this rank's hidden states even where none of its tokens predicts a response
        anchor = hidden.sum() * 0 if torch.is_grad_enabled() and hidden.requires_grad else None

        def place(values, anchored: bool):
            spread = torch.zeros(len(local), dtype=values.dtype, device=values.device).index_put((picks,), values)
            if anchored and anchor is not None:
                spread = spread + anchor
            gathered = all_gather(spread, self.cp_group)
            return torch.zeros(mb.batch.input_ids.shape, dtype=values.dtype, device=values.device).index_put(
                targets, gathered[mb.predicts[everywhere]])

        return place(logp, True), (place(entropy, False) if entropy is not None else None)

    def _run(self, chunks, micro_batches: list[PackedMicroBatch], on_output, *, forward_only: bool) -> list:
        """Megatron's forward-backward schedule over ``micro_batches``; ``on_output(mb, chunk, hidden)`` runs on the
        last pipeline stage and returns (loss, stats). Returns the stats of each micro-batch (last stage only)."""
        from megatron.core.packed_seq_params import PackedSeqParams
        from megatron.core.pipeline_parallel import get_forward_backward_func

        data = iter(micro_batches)

        def forward_step(data_iterator, chunk):
            mb = next(data_iterator)
            local = cp_local_indices(mb.cu_seqlens, self.layout.cp, self.cp_rank)
            packed = PackedSeqParams(
                qkv_format="thd", cu_seqlens_q=mb.cu_seqlens, cu_seqlens_kv=mb.cu_seqlens,
                max_seqlen_q=mb.max_seqlen, max_seqlen_kv=mb.max_seqlen, cp_group=self.cp_group)
            hidden = chunk(input_ids=mb.input_ids[local][None], position_ids=mb.pos_of[local][None],
                           attention_mask=None, packed_seq_params=packed)

            def loss_func(output):
                return on_output(mb, chunk, output[0])

            return hidden, loss_func

        # (pipeline stages exchange activations of each micro-batch's own length: mbridge sets variable_seq_lengths;
        # the schedule divides a sequence length by CP, and by TP under sequence parallelism, itself)
        longest = max(int(mb.cu_seqlens[-1]) for mb in micro_batches)
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=chunks,
            num_microbatches=len(micro_batches), seq_length=longest, micro_batch_size=1, forward_only=forward_only)

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch, *, temperature: float, reference: bool = False) -> torch.Tensor:
        """[B, L] log-probs of ``batch``'s responses (on the host: what the worker returns)."""
        return self._logprobs(batch, temperature=temperature, reference=reference).cpu()

    @torch.no_grad()
    def _logprobs(self, batch: TrainBatch, *, temperature: float, reference: bool) -> torch.Tensor:
        chunks = self.reference if reference else self.chunks
        if chunks is None:
            raise RuntimeError("this engine was built without a reference model (algo.kl_placement=none)")
        mbs = self._micro_batches(batch)
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=self.device)

        def keep(mb, chunk, hidden):
            logp = self._response_logprobs(chunk, mb, hidden, temperature, False)[0]
            out[mb.rows, : logp.shape[1]] = logp
            return hidden.sum() * 0, {}

        for chunk in chunks:
            chunk.eval()
        self._run(chunks, mbs, keep, forward_only=True)
        for chunk in self.chunks:
            chunk.train()
        return self._from_last_stage(out)

    def _from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.layout.pp > 1:
            group = self.ps.get_pipeline_model_parallel_group()
            dist.broadcast(tensor, src=dist.get_global_rank(group, self.layout.pp - 1), group=group)
        return tensor

    # --- the update -------------------------------------------------------------------------------------------
    def train_step(self, batch: TrainBatch, loss_fn: LossFn) -> dict[str, float]:
        dp_group = self.ps.get_data_parallel_group()
        units_global = torch.tensor(float(loss_fn.units(batch)), device=self.device)  # (NCCL: device tensors)
        dist.all_reduce(units_global, group=dp_group)
        units_global = max(float(units_global), 1e-8)
        mbs = self._micro_batches(batch)
        seconds = {"forward_s": 0.0, "backward_s": 0.0}
        start = time.perf_counter()
        if loss_fn.needs_reference and batch.ref_logprobs is None:
            ref = self._logprobs(batch, temperature=loss_fn.temperature, reference=True)
            for mb in mbs:
                mb.batch.ref_logprobs = ref[mb.rows, : mb.batch.input_ids.shape[1]]
            seconds["forward_s"] += time.perf_counter() - start
            start = time.perf_counter()

        def loss_of(mb, chunk, hidden):
            logp, entropy = self._response_logprobs(chunk, mb, hidden, loss_fn.temperature, True)
            loss, stats = loss_fn(logp, mb.batch, entropy)
            weight = loss_fn.units(mb.batch) / units_global
            # Megatron's schedule divides each micro-batch's loss by their number and multiplies it by CP (for
            # losses over a rank's own tokens), and DDP averages gradients over DP x CP: undo the division and the
            # DP average (the weights above already make the sum over micro-batches and DP ranks the update); the
            # CP factor and the CP average cancel, and the gathered log-probs' backward already sums over CP ranks
            scale = weight * len(mbs) * self.dp / self.layout.cp
            return loss * scale, {k: v * weight for k, v in {"loss": float(loss), **stats}.items()}

        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        per_mb = self._run(self.chunks, mbs, loss_of, forward_only=False)
        seconds["backward_s"] += time.perf_counter() - start  # (forward and backward interleave in the schedule)
        start = time.perf_counter()
        self._schedule()
        _, grad_norm, _ = self.optimizer.step()
        self.steps_done += 1
        totals = self._reduce_stats(per_mb)
        totals["grad_norm"] = float(grad_norm)
        totals["lr"] = self.optimizer.param_groups[0]["lr"]
        return totals | seconds | {"optimizer_s": time.perf_counter() - start}

    def _schedule(self) -> None:
        """Learning rate (linear warm-up, as the HF engine's) and weight decay of each parameter group, times the
        group's multipliers: Megatron marks biases and norm scales with ``wd_mult = 0`` and leaves applying it to
        the scheduler of Megatron-LM's training loop, which this engine replaces."""
        factor = min(1.0, (self.steps_done + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * factor * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.weight_decay * group.get("wd_mult", 1.0)

    def _reduce_stats(self, per_mb: list[dict]) -> dict[str, float]:
        """Sum over micro-batches, then over DP ranks (the last pipeline stage holds them; sent to every stage)."""
        local: dict[str, float] = {}
        for stats in per_mb or []:
            for k, v in stats.items():
                local[k] = local.get(k, 0.0) + float(v)
        gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, local)
        last = [r for r in range(dist.get_world_size()) if gathered[r]]
        return {k: sum(gathered[r].get(k, 0.0) for r in last) / (self.layout.tp * self.layout.cp)
                for k in dict.fromkeys(k for r in last for k in gathered[r])}

    def update_reference(self) -> None:
        if self.reference is not None:
            for ref, chunk in zip(self.reference, self.chunks, strict=True):
                ref.load_state_dict(_unwrap(chunk).state_dict(), strict=False)

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy under HF names, one full tensor at a time (gathered over TP, sent across PP), in the serving
        dtype. Collective: every rank must iterate it to the end."""
        for name, tensor in mbridge.export(self.bridge, self.chunks):
            yield name, tensor.detach().to(self.serving_dtype)

    # --- checkpoints ------------------------------------------------------------------------------------------
    def _sharded_state(self, *, with_optimizer: bool, loading: bool) -> dict:
        """What a checkpoint holds, as Megatron's sharded state dict: every tensor with its place in the full
        (unsharded) tensor, so a checkpoint written at one TP/PP/DP layout loads at another. The distributed
        optimizer's state is saved per parameter ("fully_reshardable": gathered over DP at save, re-split at load),
        not as its DP-rank buffers ("dp_reshardable", which reloads at the same TP/PP only)."""
        state = {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(self.chunks)}
        if with_optimizer:
            state["optimizer"] = self.optimizer.sharded_state_dict(
                dict(state), is_loading=loading,
                metadata={"distrib_optim_sharding_type": "fully_reshardable"})
        for i, chunk in enumerate(self.reference or []):
            state[f"reference{i}"] = chunk.sharded_state_dict(prefix="reference.")
        return state

    def _initialize_optimizer_state(self) -> None:
        """Adam's state before the first step, so that a fresh engine has the structure a checkpoint fills in.
        (torch's Adam creates it lazily in ``step()``; Megatron's ``init_state_fn`` omits ``step``, which its
        ``state_dict`` then asserts on: one shared step count per optimizer.)"""
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            for group in opt.optimizer.param_groups:
                for p in group["params"]:
                    state = opt.optimizer.state[p]
                    if not state:
                        state.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p),
                                     step=torch.tensor(0.0, device="cpu"))  # (torch's Adam: a host step)

    def _unshare_adam_steps(self) -> None:
        """megatron-core 0.16.1 restores torch Adam's ``step`` as *one* tensor shared by every parameter's state;
        torch's Adam increments each parameter's step in place, so the next update would count one step per
        parameter and get the bias correction wrong. Give each its own."""
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            for state in opt.optimizer.state.values():
                if "step" in state:
                    state["step"] = state["step"].clone()

    def save(self, path: Path, *, with_optimizer: bool) -> None:
        """Collective. ``path/megatron``: fp32 masters, optimizer and reference, sharded (``dist_checkpointing``);
        ``path/policy``: the policy as an HF model directory in the serving dtype (written by rank 0, streamed)."""
        from megatron.core import dist_checkpointing

        path = Path(path)
        (path / "megatron").mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(self._sharded_state(with_optimizer=with_optimizer, loading=False),
                                str(path / "megatron"))
        self.export_hf(path / "policy")
        if dist.get_rank() == 0:
            (path / "engine.json").write_text(json.dumps(
                {"engine": "megatron", "with_optimizer": with_optimizer, "steps_done": self.steps_done,
                 "layout": {"tp": self.layout.tp, "pp": self.layout.pp, "cp": self.layout.cp, "dp": self.dp}}))

    def export_hf(self, out_dir: Path) -> None:
        """The policy as a Hugging Face model directory (``from_pretrained`` loads it). Collective."""
        config = json.loads((Path(self.model_path) / "config.json").read_text())
        write_hf_dir(self.named_weights(), Path(out_dir), config, dtype=self.serving_dtype,
                     write=dist.get_rank() == 0)

    def load(self, path: Path) -> None:
        """Resume from ``save``'s directory, at this engine's layout (which may differ from the saved one)."""
        from megatron.core import dist_checkpointing

        path = Path(path)
        meta = json.loads((path / "engine.json").read_text())
        if meta.get("engine") != "megatron":
            raise RuntimeError(f"checkpoint {path} was written by trainer.engine={meta.get('engine')!r}; resume it "
                               "with that engine (its policy/ directory is an HF model any engine can start from)")
        if meta["with_optimizer"]:
            _restore_adam_states_by_source_keys()
            self._initialize_optimizer_state()
        check_metadata(path / "megatron")  # (nothing in a checkpoint is unpickled unchecked: safe_checkpoint)
        with weights_only_loads():
            state = dist_checkpointing.load(
                self._sharded_state(with_optimizer=meta["with_optimizer"], loading=True), str(path / "megatron"))
        for i, chunk in enumerate(self.chunks):
            _unwrap(chunk).load_state_dict(state[f"model{i}"])
        for i, chunk in enumerate(self.reference or []):
            chunk.load_state_dict({k.removeprefix("reference."): v for k, v in state[f"reference{i}"].items()})
        if meta["with_optimizer"]:
            self.optimizer.load_state_dict(state["optimizer"])
            self._unshare_adam_steps()
        self.steps_done = meta["steps_done"]
