"""The one-GPU check: the engines' steps on CUDA, in bf16, against the same steps on CPU. Skipped without a GPU.

On a machine with one CUDA GPU (r1's lent H200; its image has torch + CUDA but no vLLM, Ray or Megatron - carry
megatron-core and mbridge wheels for the Megatron checks, see docs/gpu.md):

    python -m pytest -q tests/test_gpu.py

Every check compares against an independent reference (the CPU fp32 step of the same engine, or the other engine)
and asserts where each tensor lives, so a device mistake fails here as it would in a run. What a CPU-only CI cannot
reach, this is for: CUDA kernels, autocast, NCCL. (Device mistakes themselves are caught on CPU too:
tests/test_device_discipline.py.)
"""

from __future__ import annotations

import importlib.util
from datetime import timedelta

import pytest
import torch

from tests.test_megatron_bridge import _save_hf
from tests.test_megatron_engine import OPTIM, _batch, _loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (run `python -m pytest tests/test_gpu.py` on a GPU machine)")
needs_megatron = pytest.mark.skipif(importlib.util.find_spec("megatron") is None
                                    or importlib.util.find_spec("mbridge") is None,
                                    reason="needs megatron-core and mbridge installed")


def _hf(hf_dir: str, dtype: str):
    from r1.engines.hf_train import HFTrainEngine

    return HFTrainEngine(hf_dir, micro_batch_size=8, with_reference=True, dtype=dtype, **OPTIM)


def test_the_hf_engines_bf16_step_on_cuda_is_its_fp32_step(tmp_path):
    """bf16 autocast over fp32 masters on the GPU against fp32 on the CPU (the same engine, forced to CPU)."""
    hf_dir = _save_hf(tmp_path / "hf", "qwen2", tied=False)
    gpu = _hf(hf_dir, "bfloat16")
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in gpu.model.parameters())
    gpu_before = gpu.compute_logprobs(_batch(), temperature=0.9)
    gpu_stats = gpu.train_step(_batch(), _loss())
    cpu = _hf(hf_dir, "float32")  # built where a GPU is, then moved: the engine keeps every tensor on .device
    cpu.device = torch.device("cpu")
    cpu.model.to("cpu")
    cpu.reference.to("cpu")
    cpu_before = cpu.compute_logprobs(_batch(), temperature=0.9)
    cpu_stats = cpu.train_step(_batch(), _loss())
    mask = _batch().response_mask.bool()
    torch.testing.assert_close(gpu_before[mask], cpu_before[mask], atol=5e-2, rtol=5e-2)  # bf16 logits
    assert gpu_stats["loss"] == pytest.approx(cpu_stats["loss"], rel=5e-2, abs=5e-3)
    assert gpu_stats["grad_norm"] == pytest.approx(cpu_stats["grad_norm"], rel=5e-2)
    for name, tensor in dict(gpu.named_weights()).items():
        assert tensor.device.type == "cuda" and tensor.dtype == torch.bfloat16, name


def _megatron_cuda_step(rank: int, world: int, hf_dir: str):
    from r1.engines.megatron.engine import MegatronTrainEngine
    from r1.engines.megatron.layout import ParallelLayout

    engine = MegatronTrainEngine(hf_dir, layout=ParallelLayout(), micro_batch_tokens=25, with_reference=True,
                                 dtype="bfloat16", **OPTIM)
    assert engine.device.type == "cuda"
    before = engine.compute_logprobs(_batch(), temperature=0.9)
    stats = engine.train_step(_batch(), _loss())
    return before, stats, {k: v.cpu() for k, v in engine.named_weights()}


@needs_megatron
def test_the_megatron_engines_bf16_step_on_cuda_is_the_hf_engines(tmp_path):
    from tests.gloo_ranks import run_ranks

    hf_dir = _save_hf(tmp_path / "hf", "qwen2", tied=False)
    hf = _hf(hf_dir, "bfloat16")
    hf_before = hf.compute_logprobs(_batch(), temperature=0.9)
    hf_stats, hf_weights = hf.train_step(_batch(), _loss()), dict(hf.named_weights())
    before, stats, weights = run_ranks(_megatron_cuda_step, 1, hf_dir, tmp_path=tmp_path)[0]
    mask = _batch().response_mask.bool()
    torch.testing.assert_close(before[mask], hf_before[mask], atol=5e-2, rtol=5e-2)
    assert stats["loss"] == pytest.approx(hf_stats["loss"], rel=2e-2, abs=5e-3)
    for name, tensor in hf_weights.items():
        torch.testing.assert_close(weights[name].float(), tensor.float().cpu(), atol=3e-2, rtol=1e-2)


def test_the_nccl_sync_group_takes_its_timeout_and_broadcasts_device_tensors():
    """A one-rank NCCL weight-sync group: its options carry ``sync.timeout_s`` (twice it: the watchdog's), its
    broadcasts run on CUDA tensors, and abort() releases it."""
    from r1.distributed.bucketed_broadcast import BroadcastGroup, free_port, manifest_of

    group = BroadcastGroup("127.0.0.1", free_port(), 0, 1, backend="nccl", timeout_s=30)
    assert group.device.type == "cuda"
    assert group.pg.options._timeout == timedelta(seconds=60)
    weights = [("a", torch.arange(6.0, device="cuda").view(2, 3)), ("b", torch.ones(4, device="cuda"))]
    assert group.send(weights, manifest_of(weights), 16, version=1) == 40
    group.abort()


def test_a_staged_version_leaves_the_gpu_for_pinned_host_memory_that_is_reused():
    """What a vLLM worker's receiver does with a bucket NCCL received into the GPU: an equal copy in pinned host
    memory (made on the receiver's own stream), which the next version reuses once the last one is loaded."""
    from r1.distributed.staged_receiver import BucketPool

    pool = BucketPool(torch.device("cuda"))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        bucket = pool.device_bucket(1024, torch.bfloat16)
        assert bucket.device.type == "cuda" and bucket.dtype == torch.bfloat16
        bucket.copy_(torch.randn(1024, device="cuda"))
        staged = pool.to_host(bucket)
    assert staged.device.type == "cpu" and staged.is_pinned()
    assert torch.equal(staged, bucket.cpu())
    pool.recycle([staged])
    assert pool.host(1024, torch.bfloat16).data_ptr() == staged.data_ptr()


def _colocated_member(spec: dict, out) -> None:  # a second process on the same GPU (what a colocated vLLM worker is)
    from r1.distributed.staged_receiver import StagedReceiver, SyncSpec

    receiver = StagedReceiver(SyncSpec.from_dict(spec), 1, backend="nccl", device=torch.device("cuda", 0))
    weights, release = receiver.take(1, timeout_s=120)
    out.put([(n, t.clone(), t.is_pinned()) for n, t in weights])
    release()


def test_a_colocated_push_hands_cuda_ipc_buffers_to_another_process_on_the_gpu():
    """The colocated transport on a GPU: the sender's bucket buffer is CUDA memory whose IPC handle a second process
    on the same GPU opens (no copy on the way), copying each bucket into its pinned host staging. Bit for bit, bf16,
    a tensor bigger than a bucket (the buffer grows and is shared anew mid-push)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from r1.distributed.bucketed_broadcast import free_port, manifest_of
    from r1.distributed.ipc_channel import IpcSender, share, shared_buffer
    from r1.distributed.staged_receiver import SyncSpec, SyncWatch

    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = [("embed", torch.randn(64, 32, device="cuda", generator=gen).to(torch.bfloat16)),
               ("head", torch.randn(512, 32, device="cuda", generator=gen).to(torch.bfloat16)),
               ("norm", torch.randn(32, device="cuda", generator=gen).to(torch.bfloat16))]
    assert share(shared_buffer(16, torch.device("cuda")))["kind"] == "cuda"
    host, port = "127.0.0.1", free_port()
    store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=120))
    spec = SyncSpec(host, port, 2, 1, manifest_of(weights), 8192, 120.0, "ipc", source=0)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    member = ctx.Process(target=_colocated_member, args=(spec.as_dict(), out))
    member.start()
    try:
        SyncWatch(spec, 1).wait_joined(lambda: None)
        sent = IpcSender(store, 0, [1], torch.device("cuda", 0), 120.0).send(iter(weights), spec.manifest, 8192, 1)
        staged = out.get(timeout=120)
    finally:
        member.join(timeout=60)
    assert sent == sum(t.numel() * 2 for _, t in weights)
    assert [n for n, _, _ in staged] == [n for n, _ in weights]
    for (_, got, pinned), (_, want) in zip(staged, weights):
        assert pinned and got.dtype == torch.bfloat16 and torch.equal(got, want.cpu())


def test_the_nvml_monitor_reads_the_real_driver():
    """NVML through nvidia-ml-py, as the node monitor opens it: every GPU of the machine readable, with the readings
    any data-centre GPU supports, in the units r1 reports (GB, W, C), and the Xid event set drains without blocking."""
    from r1.health.nvml import NodeGpus, open_nvml

    nvml, why = open_nvml()
    assert nvml is not None, why
    gpus = NodeGpus(nvml)
    try:
        assert gpus.handles and not gpus.unreadable
        sample = gpus.read(min(gpus.handles))
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        assert abs(sample["mem_total_gb"] - total) < 0.05 * total  # NVML and CUDA agree on the memory
        assert 0 < sample["temperature_c"] < 110 and 0 < sample["power_w"] <= sample["power_limit_w"] * 1.2
        assert sample["sm_clock_mhz"] > 0 and "ecc_volatile_uncorrected" in sample
        assert gpus.wait_xids(0) == []
    finally:
        gpus.close()
