"""The GPU kinds the planner knows: memory, peak dense bf16 FLOP/s, HBM and NVLink bandwidth (vendor data sheets).

Memory is what ``nvidia-smi`` reports as total (a little under the marketing GB); a CUDA context, NCCL's buffers and
the caching allocator's fragmentation take ``planner.reserved_gib`` of it on every GPU before any tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB, GIB = 2**20, 2**30


@dataclass(frozen=True)
class GPUKind:
    name: str
    memory_bytes: int  # nvidia-smi's total
    bf16_flops: float  # dense (no sparsity) bf16 tensor-core peak
    hbm_bytes_s: float
    nvlink_bytes_s: float  # per GPU, all links, one direction
    sheet: str  # where the figures are from


# NVIDIA A100 data sheet (nvidia-a100-datasheet-us-nvidia-1758950-r4): SXM 312 TFLOPS bf16 dense, HBM2 1,555 GB/s
# (40GB) / HBM2e 2,039 GB/s (80GB), NVLink 600 GB/s. H100 data sheet (SXM5): 989 TFLOPS bf16 dense (1,979 with
# sparsity), HBM3 3.35 TB/s, NVLink 900 GB/s. H200 data sheet (SXM): 141 GB HBM3e, 4.8 TB/s, 989 TFLOPS, NVLink 900 GB/s.
KINDS = {k.name: k for k in [
    GPUKind("a100_40gb", 40960 * MIB, 312e12, 1555e9, 300e9, "NVIDIA A100 data sheet, SXM4 40GB"),
    GPUKind("a100_80gb", 81920 * MIB, 312e12, 2039e9, 300e9, "NVIDIA A100 data sheet, SXM4 80GB"),
    GPUKind("h100_80gb", 81559 * MIB, 989e12, 3350e9, 450e9, "NVIDIA H100 data sheet, SXM5 80GB"),
    GPUKind("h200_141gb", 143771 * MIB, 989e12, 4800e9, 450e9, "NVIDIA H200 data sheet, SXM 141GB"),
]}

# names GPUs go by in Slurm gres types and Kubernetes node labels (GPU feature discovery's nvidia.com/gpu.product,
# e.g. NVIDIA-H100-80GB-HBM3), most specific first
_ALIASES = [("a100-sxm4-40gb", "a100_40gb"), ("a100-40", "a100_40gb"), ("a100_40", "a100_40gb"),
            ("a100-sxm4-80gb", "a100_80gb"), ("a100-80", "a100_80gb"), ("a100_80", "a100_80gb"),
            ("h200", "h200_141gb"), ("h100", "h100_80gb"), ("a100", "a100_80gb")]


def kind(name: str) -> GPUKind:
    if name not in KINDS:
        raise ValueError(f"planner.gpu={name!r} is not a GPU kind r1 knows: choose one of {', '.join(KINDS)}")
    return KINDS[name]


def from_label(text: str) -> str | None:
    """The kind a gres type or node label names (``gpu:h100:8``, ``NVIDIA-A100-SXM4-40GB``), or None."""
    low = text.lower()
    return next((kind_name for alias, kind_name in _ALIASES if alias in low), None)
