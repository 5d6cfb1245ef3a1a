"""Device mistakes made visible on CPU: inside ``strict_devices()``, r1's code may not create a tensor without naming
its device.

On a GPU, ``torch.zeros(n)`` in an engine is a CPU tensor next to a CUDA model: a crash ("Expected all tensors to be
on the same device"), or an NCCL collective on a CPU tensor ("No backend type associated with device type cpu"). On
CPU the same line is right by accident, so CI never sees it. This mode makes it an error where it is written: a
torch factory (``zeros``, ``tensor``, ``arange``, ``full``, ... - torch's own list of functions that take a device)
called from a file under ``r1/`` without ``device=`` raises ``DeviceMistake`` naming the file and line. Engine code
says the model's device, or ``"cpu"`` for host-side bookkeeping. Library code (torch, transformers, megatron-core)
is not checked: only the immediate caller's file counts.

Why not ``torch.device("meta")`` around the step, so that stray tensors land elsewhere: meta tensors silently do
nothing in gloo collectives and in index ops on CPU data (uninitialised values, no error), and autograd runs custom
backward functions outside any mode. A factory call is the one place where every such mistake starts.

The autograd engine runs backward without the caller's modes: ``strict_devices`` re-enters itself around every custom
``autograd.Function.backward`` (r1's context-parallel gather, Megatron's TP mappings), so their tensors are checked
too. Cost: a Python call per torch function, ~3x a tiny model's step; a test harness, not a run mode.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from torch.autograd.function import BackwardCFunction
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

R1_DIR = str(Path(__file__).resolve().parent.parent / "r1") + "/"
_TORCH_DIR = str(Path(torch.__file__).resolve().parent) + "/"
_HERE = str(Path(__file__).resolve())
_FACTORIES = _device_constructors()
_FROM_DATA = (torch.tensor, torch.as_tensor, torch.asarray)  # given a tensor, these keep its device


class DeviceMistake(RuntimeError):
    pass


_DISPATCH = (_TORCH_DIR + "overrides.py", _TORCH_DIR + "utils/_device.py", _HERE)  # (the mode's own frames)


def _caller():
    """The Python frame that called the factory: a factory torch or a library calls is theirs, not r1's."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename in _DISPATCH:
        frame = frame.f_back
    return frame


class RejectDeviceless(TorchFunctionMode):
    def __init__(self, include: tuple[str, ...] = (R1_DIR,)):
        super().__init__()
        self.include = include
        self.checked = 0  # factory calls from r1 seen (each named its device): the mode was in force

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES:
            frame = _caller()
            if frame is not None and frame.f_code.co_filename.startswith(self.include):
                if kwargs.get("device") is None and not (func in _FROM_DATA and args and torch.is_tensor(args[0])):
                    raise DeviceMistake(
                        f"torch.{func.__name__} without device= at {frame.f_code.co_filename}:{frame.f_lineno} "
                        f"({frame.f_code.co_name}): on a GPU this tensor is on the CPU. Name the device: the model's, "
                        "or 'cpu' for host-side bookkeeping")
                self.checked += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def strict_devices(include: tuple[str, ...] = (R1_DIR,)):
    """The region in which r1's factory calls must name a device (see the module docstring); yields the mode."""
    mode = RejectDeviceless(include)
    original = BackwardCFunction.apply

    def apply(self, *args):
        with mode:
            return original(self, *args)

    BackwardCFunction.apply = apply
    try:
        with mode:
            yield mode
    finally:
        BackwardCFunction.apply = original
