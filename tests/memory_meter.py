"""What a CPU step really allocates, measured two ways (the planner's calibration, tests/test_plan_calibration.py).

``SavedBytes``: the bytes autograd keeps from the forward pass for the backward (the activations), each storage once,
the parameters' own storages excluded: saved-tensor hooks see every tensor an autograd function saves, Megatron's
recomputed layers' inputs included (its ``CheckpointFunction`` saves them), the tensors inside a recomputed region
not (torch's checkpoint keeps none).

``LiveBytes``: a dispatch mode that follows every tensor storage an op creates while it is on (an op's output on the
storage of one of its inputs - in place, a view - is not new), until the last tensor on it is gone: the peak of what
was allocated during the region (transients included), above what lived before.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class SavedBytes:
    def __init__(self, exclude=()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor):
        if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr and ptr not in self.exclude:
                self.storages[ptr] = max(self.storages.get(ptr, 0), storage.nbytes())
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live: dict[int, list] = {}  # storage pointer -> [bytes, tensors alive on it]
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                self._follow(tensor, inputs)
        return out

    def _follow(self, tensor, inputs) -> None:
        storage = tensor.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if not ptr or not size:
            return
        entry = self.live.get(ptr)
        if entry is None and ptr in inputs:  # an in-place op or a view of memory allocated before: not new
            return
        if entry is None:
            entry = self.live[ptr] = [size, 0]
            self.now += size
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        weakref.finalize(tensor, self._gone, ptr)

    def _gone(self, ptr) -> None:
        entry = self.live.get(ptr)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= entry[0]
                del self.live[ptr]
