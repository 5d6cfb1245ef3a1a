"""Train engine on plain torch + HF transformers: the CPU path (and a small-GPU path) of the training pool.

Data parallel over ``torch.distributed`` (gloo on CPU): every rank holds the full model, takes a shard of each
mini-batch and gradients are summed with weights ``units_rank / units_global``, so the update equals the
single-process update on the whole mini-batch regardless of how it was sharded or micro-batched. A rank whose
shard is empty (fewer rows than ranks) still takes part in every collective, with zero gradients.

Mixed precision: parameters and optimizer state are fp32 ("master weights") whatever ``model.dtype`` says, and the
forward/backward passes run under autocast in ``model.dtype``. Stepping AdamW directly on bf16 parameters would
round most updates at lr 3e-6 to nothing (bf16 keeps 8 significant bits). The rollout pool and the exported policy
get the weights in the serving dtype; checkpoints also keep the fp32 masters, so resume is exact.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from r1.engines.prompt_packing import pack_by_prompt
from r1.engines.protocols import LossFn
from r1.engines.sequence_packing import pack_sequences, plan_micro_batches
from r1.types import TrainBatch


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, *, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(targets) under ``logits / temperature`` ([B, N, V] -> [B, N]), and (no grad) the entropy of each
    distribution: both from one log-softmax, the largest tensor of a small-model step."""
    logits = logits.float()
    if temperature != 1.0:  # (x / 1.0 is x: skip a full-vocabulary copy)
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1)
    return picked, entropy


def first_response_column(batch: TrainBatch) -> int:
    """The first column holding a response token in any row (>= 1: position 0 has no prediction)."""
    columns = batch.response_mask.any(dim=0).nonzero()
    return max(1, int(columns[0])) if len(columns) else 1


def response_logprobs(model, batch: TrainBatch, temperature: float, *, with_entropy: bool = False,
                      device: torch.device | str = "cpu", autocast=None, pack: bool = False):
    """Log-probs [B, L] of ``batch.input_ids`` where ``batch.response_mask`` is 1 (0 before the first response
    column; prompt positions are not computed), and, with ``with_entropy``, the entropy there (no grad).

    With ``pack`` all rows are one packed sequence (``r1.engines.sequence_packing``). Otherwise rows that share a
    prompt (a GRPO group) are packed into one sequence whose prompt is computed once (``r1.engines.prompt_packing``),
    and failing that only the positions that predict a response token are projected to the vocabulary
    (``logits_to_keep``): the loss never reads the others."""
    autocast = autocast if autocast is not None else contextlib.nullcontext()
    if (packed := pack_sequences(batch) if pack else pack_by_prompt(batch)) is not None:
        with autocast:
            out = model(input_ids=packed.input_ids.to(device), attention_mask=packed.attention_mask.to(device),
                        position_ids=packed.position_ids.to(device))
        src, dst = tuple(i.to(device) for i in packed.src), tuple(i.to(device) for i in packed.dst)
        picked, entropy = token_logprobs(out.logits[src][None], packed.targets.to(device)[None], temperature,
                                         with_entropy=with_entropy)

        def unpack(values):
            return torch.zeros(batch.input_ids.shape, dtype=values.dtype, device=device).index_put(dst, values[0])

        return unpack(picked), (unpack(entropy) if entropy is not None else None)
    start = first_response_column(batch)
    ids = batch.input_ids.to(device)
    with autocast:
        out = model(input_ids=ids, attention_mask=batch.attention_mask.to(device),
                    logits_to_keep=ids.shape[1] - start + 1)  # positions start-1 .. L-1 (the last predicts none)
    picked, entropy = token_logprobs(out.logits[:, :-1], ids[:, start:], temperature, with_entropy=with_entropy)
    return F.pad(picked, (start, 0)), (F.pad(entropy, (start, 0)) if entropy is not None else None)


def decay_groups(model, weight_decay: float) -> list[dict]:
    """Parameter groups for AdamW: biases and 1-D parameters (norm scales) are not decayed, matrices and embeddings
    are. Megatron's optimizer applies the same rule, so both train engines take the same step."""
    params = list(model.named_parameters())
    flat = [p for n, p in params if p.ndim < 2 or n.endswith(".bias")]
    return [{"params": [p for n, p in params if not (p.ndim < 2 or n.endswith(".bias"))]},
            {"params": flat, "weight_decay": 0.0}]


def _load_parameters(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Every parameter from ``tensors``, none missing and none unknown (tied weights are one parameter: safetensors
    stores them once, so the check is over ``named_parameters``, not the state dict's aliases)."""
    names = {n for n, _ in model.named_parameters()}
    missing, unknown = sorted(names - set(tensors)), sorted(set(tensors) - names)
    if missing or unknown:
        raise RuntimeError(f"{source} does not match the model: missing {missing[:5]}, unknown {unknown[:5]}")
    model.load_state_dict(tensors, strict=False)  # (strict would ask for tied aliases the file rightly omits)


def load_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF safetensors directory, sharded (``model.safetensors.index.json``) or not."""
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for f in files for k, v in load_file(str(directory / f)).items()}
    return load_file(str(directory / "model.safetensors"))


def training_bytes(num_params: int, *, with_reference: bool) -> int:
    """What the HF engine holds per GPU before any activation: every rank keeps the whole model as fp32 masters (4
    bytes a parameter), their fp32 gradients (4) and AdamW's two moments (8), and the reference policy as an fp32
    copy (4)."""
    return num_params * (16 + (4 if with_reference else 0))


def check_fits(num_params: int, capacity_bytes: int, *, with_reference: bool, what: str) -> None:
    """Refuse, before a byte is allocated, a model whose weights, gradients and optimizer state alone exceed the
    device's memory (activations and the [tokens x vocab] logits come on top)."""
    need = training_bytes(num_params, with_reference=with_reference)
    if need > capacity_bytes:
        raise ValueError(
            f"trainer.engine=hf keeps the whole model on every GPU: {num_params / 1e9:.2f}B parameters need "
            f"{need / 2**30:.0f} GiB for fp32 weights, gradients, AdamW state{' and the reference' if with_reference else ''} "
            f"before any activation, and {what} has {capacity_bytes / 2**30:.0f} GiB. Use trainer=megatron (tensor, "
            "pipeline and context parallelism, a distributed optimizer), as +experiment=r1_zero does")


def count_parameters(model_path: str) -> int:
    """The parameter count of the model at ``model_path``, from its config alone (built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return sum(p.numel() for p in model.parameters())


REDUCE_BUCKET_BYTES = 256 * 2**20  # DDP's default bucket is 25 MB; fewer, larger collectives suit a whole-step reduce


def all_reduce_in_buckets(tensors: list[torch.Tensor], bucket_bytes: int, group=None) -> None:
    """Sum ``tensors`` over ``group`` in place, a flat bucket of up to ``bucket_bytes`` per collective (of one dtype
    and device; a larger tensor goes alone): one all-reduce per parameter would be thousands of small NCCL calls a
    step for a 7B model, each paying the collective's latency."""
    def flush(bucket: list[torch.Tensor]) -> None:
        if len(bucket) == 1:
            dist.all_reduce(bucket[0], group=group)
            return
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, group=group)
        for t, part in zip(bucket, flat.split([t.numel() for t in bucket]), strict=True):
            t.copy_(part.view_as(t))

    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (t.dtype != bucket[0].dtype or t.device != bucket[0].device
                       or size + t.numel() * t.element_size() > bucket_bytes):
            flush(bucket)
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        flush(bucket)


class HFTrainEngine:
    def __init__(
        self,
        model_path: str,
        *,
        lr: float,
        betas: tuple[float, float],
        weight_decay: float,
        warmup_steps: int,
        grad_clip: float,
        micro_batch_size: int,
        with_reference: bool,
        micro_batch_tokens: int = 0,
        dtype: str = "float32",
        seed: int = 0,
    ):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        if cuda:
            check_fits(count_parameters(model_path), torch.cuda.get_device_properties(self.device).total_memory,
                       with_reference=with_reference, what=f"GPU {torch.cuda.get_device_name(self.device)}")
        self.serving_dtype = getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)  # fp32 master weights
        self.model.to(self.device).train()
        self.model.config.use_cache = False
        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False) if with_reference else None
        self.optimizer = torch.optim.AdamW(
            decay_groups(self.model, weight_decay), lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=1e-8
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        )
        self.grad_clip = grad_clip
        self.micro_batch_size = micro_batch_size
        self.micro_batch_tokens = micro_batch_tokens  # > 0: packed micro-batches of up to this many tokens
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.data_parallel_rank = dist.get_rank() if self.distributed else 0
        self.data_parallel_size = dist.get_world_size() if self.distributed else 1
        self.collective = False  # every rank holds the whole model: rank 0 saves and sends it alone

    def _autocast(self):
        """Forward/backward in the serving dtype (bf16/fp16); a no-op for fp32."""
        if self.serving_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.serving_dtype)

    # --- forward passes ---------------------------------------------------------------------------------------
    def _micro_batches(self, batch: TrainBatch) -> Iterator[tuple[torch.Tensor, TrainBatch]]:
        """(rows of ``batch``, those rows): ``micro_batch_size`` rows at a time, or, with ``micro_batch_tokens``,
        rows planned into packed micro-batches of up to that many tokens (a longer row goes alone)."""
        if self.micro_batch_tokens:
            lengths = batch.attention_mask.sum(dim=1).tolist()
            plan = [torch.tensor(rows, device="cpu") for rows in plan_micro_batches(lengths, self.micro_batch_tokens)]
        else:
            plan = list(torch.arange(len(batch), device="cpu").split(self.micro_batch_size)) if len(batch) else []
        for rows in plan:
            yield rows, batch.select(rows).trimmed()

    def _response_logprobs(self, model, mb: TrainBatch, temperature: float, *, with_entropy: bool = False):
        return response_logprobs(model, mb, temperature, with_entropy=with_entropy, device=self.device,
                                 autocast=self._autocast(), pack=self.micro_batch_tokens > 0)

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch, *, temperature: float, reference: bool = False) -> torch.Tensor:
        model = self.reference if reference else self.model
        if model is None:
            raise RuntimeError("this engine was built without a reference model (algo.kl_placement=none)")
        was_training = model.training
        model.eval()
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device="cpu")
        for rows, mb in self._micro_batches(batch):
            logp, _ = self._response_logprobs(model, mb, temperature)
            out[rows, : logp.shape[1]] = logp.cpu()
        model.train(was_training)
        return out

    # --- the update -------------------------------------------------------------------------------------------
    def train_step(self, batch: TrainBatch, loss_fn: LossFn) -> dict[str, float]:
        units_local = float(loss_fn.units(batch))
        units_global = torch.tensor(units_local, device=self.device)  # (NCCL reduces device tensors only)
        if self.distributed:
            dist.all_reduce(units_global)
        units_global = max(float(units_global), 1e-8)

        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        seconds = {"forward_s": 0.0, "backward_s": 0.0}
        for _, mb in self._micro_batches(batch):
            start = time.perf_counter()
            if loss_fn.needs_reference and mb.ref_logprobs is None:
                with torch.no_grad():
                    mb.ref_logprobs, _ = self._response_logprobs(self.reference, mb, loss_fn.temperature)
            logp, entropy = self._response_logprobs(self.model, mb, loss_fn.temperature, with_entropy=True)
            loss, stats = loss_fn(logp, mb.to(self.device), entropy)
            weight = loss_fn.units(mb) / units_global
            mid = time.perf_counter()
            (loss * weight).backward()
            seconds["forward_s"] += mid - start
            seconds["backward_s"] += time.perf_counter() - mid
            stats = {"loss": loss.item(), **stats}
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v * weight
        start = time.perf_counter()

        if self.distributed:
            # Every rank reduces every parameter (a rank with an empty shard, or a parameter this shard did not
            # reach, contributes zeros) and the stats of all ranks: the collectives match whatever the shards held.
            for p in self.model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            all_reduce_in_buckets([p.grad for p in self.model.parameters()], REDUCE_BUCKET_BYTES)
            per_rank: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
            dist.all_gather_object(per_rank, totals)
            totals = {k: sum(r.get(k, 0.0) for r in per_rank) for k in dict.fromkeys(k for r in per_rank for k in r)}
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        totals["grad_norm"] = float(grad_norm)
        totals["lr"] = self.scheduler.get_last_lr()[0]
        return totals | seconds | {"optimizer_s": time.perf_counter() - start}

    def update_reference(self) -> None:
        if self.reference is not None:
            self.reference.load_state_dict(self.model.state_dict())

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy in the serving dtype (what the rollout pool loads): the fp32 masters, cast."""
        for name, param in self.model.named_parameters():
            yield name, param.detach().to(self.serving_dtype)

    # --- checkpoints ------------------------------------------------------------------------------------------
    def save(self, path: Path, *, with_optimizer: bool) -> None:
        """Policy as an HF safetensors directory in the serving dtype (loadable by ``from_pretrained``), the fp32
        master weights if they differ from it, optimizer and reference."""
        from safetensors.torch import save_file

        path = Path(path)
        policy = {n: p.detach().to(self.serving_dtype).contiguous() for n, p in self.model.named_parameters()}
        self.model.save_pretrained(path / "policy", state_dict=policy, safe_serialization=True)
        config = json.loads((path / "policy" / "config.json").read_text())
        config["dtype"] = str(self.serving_dtype).removeprefix("torch.")
        (path / "policy" / "config.json").write_text(json.dumps(config, indent=2))
        if self.serving_dtype != torch.float32:
            save_file(self._parameters(self.model), str(path / "master_weights.safetensors"))
        if self.reference is not None:
            save_file(self._parameters(self.reference), str(path / "reference.safetensors"))
        if with_optimizer:
            torch.save(
                {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                path / "optimizer.pt",
            )
        (path / "engine.json").write_text(json.dumps({"engine": "hf", "with_optimizer": with_optimizer}))

    @staticmethod
    def _parameters(model) -> dict[str, torch.Tensor]:
        """Parameters by name (tied weights appear once: safetensors refuses shared storage)."""
        return {n: p.detach().contiguous() for n, p in model.named_parameters()}

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file

        path = Path(path)
        master = path / "master_weights.safetensors"
        policy = load_file(str(master)) if master.exists() else load_safetensors_dir(path / "policy")
        _load_parameters(self.model, {k: v.float() for k, v in policy.items()}, f"{path} (policy)")
        if self.reference is not None:
            reference = path / "reference.safetensors"
            if not reference.exists():  # (a run with a reference model writes one with every checkpoint)
                raise RuntimeError(f"checkpoint {path} has no reference.safetensors, and this run's loss needs "
                                   "the reference model: resume from a checkpoint of a run with the same algo")
            _load_parameters(self.reference, load_file(str(reference)), f"{reference}")
        if (path / "optimizer.pt").exists():  # tensors and plain values only: nothing a planted file names runs
            state = torch.load(path / "optimizer.pt", weights_only=True)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
