"""Loading a Megatron (torch.distributed.checkpoint) checkpoint without running code a planted file names.

``dist_checkpointing.load`` unpickles twice: the checkpoint's ``.metadata`` (``pickle.load`` in torch's
``FileSystemReader``) and every non-tensor item (``torch.load(..., weights_only=False)`` in its load planner).
Whoever can write the run directory (a shared PVC, a scratch filesystem) could make a resume run anything. So before
Megatron reads a checkpoint, ``.metadata`` is read by an unpickler that builds only torch.distributed.checkpoint's
own metadata types, tensor sizes, dtypes and layouts (anything else: refused, nothing constructed), and during the
load ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` makes torch's own weights-only unpickler read every other item, whatever the
call site asked for (it reads the variable at each ``torch.load``).
"""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path

import torch

METADATA = ".metadata"
_PLAIN = {("collections", "OrderedDict"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
          ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
          ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}  # (a storage_meta's checkpoint id: a path)


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A checkpoint file names something other than data: it is not loaded."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _PLAIN:
            return super().find_class(module, name)
        if module.startswith("torch.distributed.checkpoint.") and "." not in name:  # its own types, nothing it imports
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__.startswith("torch.distributed.checkpoint."):
                return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype | torch.layout
                                             | torch.memory_format):
            return getattr(torch, name)
        raise UnsafeCheckpoint(f"{module}.{name}")


def check_metadata(checkpoint_dir: Path) -> None:
    """Read ``checkpoint_dir/.metadata`` with the restricted unpickler; raise ``UnsafeCheckpoint`` naming the file
    and the global it asked for if it names anything but checkpoint metadata."""
    path = Path(checkpoint_dir) / METADATA
    with open(path, "rb") as f:
        try:
            _MetadataUnpickler(f).load()
        except UnsafeCheckpoint as err:
            raise UnsafeCheckpoint(f"{path} asks to build {err} - not checkpoint metadata; refusing to load it "
                                   "(a planted or foreign file: restore this checkpoint from a trusted copy)") from None


@contextlib.contextmanager
def weights_only_loads():
    """Within: every ``torch.load`` in this process is weights-only, whatever its ``weights_only`` argument."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before
