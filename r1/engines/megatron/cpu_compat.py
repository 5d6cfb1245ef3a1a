"""Megatron-core 0.16.1 on CPU (fp32, gloo): the few places where it assumes CUDA, and nothing else.

Applied by ``apply()`` only when no GPU is present; on a GPU machine it does nothing and Megatron runs unchanged.
Each patch says which Megatron code needs it. The same orchestration code then runs here (tests, CI, laptops) and on
a cluster; only these device details differ.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_applied = False
_lock = threading.Lock()
_threads = threading.local()
CPU = torch.device("cpu")


def _to_cpu(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return CPU
    return device


class CudaToCpu(TorchFunctionMode):
    """Tensor factories and ``.to`` calls that name ``"cuda"`` get the CPU (the pipeline schedules allocate their
    token counters with ``device="cuda"``; ``Tensor.to(torch.cuda.current_device())`` appears throughout), and
    ``Tensor.type()`` names CPU tensors as their CUDA types.
    A torch function mode is per thread: ``apply()`` enters it on the calling thread, which must be the thread
    that computes (the training worker runs every engine call on one compute thread)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _to_cpu(kwargs["device"])
        if func is torch.Tensor.to and args:
            args = tuple(_to_cpu(a) for a in args)
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and out.startswith("torch."):
            # Megatron's optimizers (distrib_optimizer, optimizer, clip_grads) dispatch on the type *string*
            # ("torch.cuda.FloatTensor" for fp32 params, ...) and raise for anything else
            return out.replace("torch.", "torch.cuda.", 1)
        return out


def apply() -> None:
    """Patch Megatron for CPU (once per process) and enter the device mode on this thread (once per thread)."""
    if torch.cuda.is_available():
        return
    global _applied
    with _lock:
        if not _applied:
            _patch_torch_cuda()
            _patch_megatron()
            _applied = True
    if not getattr(_threads, "mode", None):
        _threads.mode = CudaToCpu()
        _threads.mode.__enter__()


def _patch_torch_cuda() -> None:
    # Megatron asks torch.cuda for "the" device (RotaryEmbedding.get_emb, p2p_communication's shape buffers,
    # attention's inference buffers), synchronizes after p2p transfers and moves modules with .cuda().
    torch.cuda.current_device = lambda: CPU
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self


def _patch_megatron() -> None:
    import operator
    from functools import reduce

    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.tensor_parallel import random as mcore_random

    # GlobalMemoryBuffer.get_tensor allocates on torch.cuda.current_device() by index
    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        required = reduce(operator.mul, tensor_shape, 1)
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < required:
            self.buffer[(name, dtype)] = torch.empty(required, dtype=dtype, device=CPU, requires_grad=False)
        return self.buffer[(name, dtype)][0:required].view(*tensor_shape)

    mcore_utils.GlobalMemoryBuffer.get_tensor = get_tensor

    # CudaRNGStatesTracker keeps per-region CUDA generator states (tensor-parallel weight init, dropout); on CPU the
    # same bookkeeping with CPU generator states
    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outside = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outside)

    mcore_random.CudaRNGStatesTracker.add = add
    mcore_random.CudaRNGStatesTracker.fork = fork

    # activation recomputation (CheckpointFunction) saves and restores the "CUDA" generator state around the
    # recomputed forward, so dropout draws the same numbers twice: on CPU that generator is the CPU one
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)

    # clip_grad_by_total_norm_fp32 asserts torch.cuda.FloatTensor grads (it feeds apex's multi-tensor kernel)
    def clip_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        coeff = max_norm / (total_norm + 1.0e-6)
        if coeff < 1.0:
            for p in parameters:
                g = getattr(p, "decoupled_grad", None) if use_decoupled_grad else p.grad
                if g is not None:
                    mcore_utils.to_local_if_dtensor(g).detach().mul_(coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_by_total_norm
    optimizer.clip_grad_by_total_norm_fp32 = clip_by_total_norm
