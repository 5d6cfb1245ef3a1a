"""Trainer -> rollout weight sync over a dedicated torch.distributed process group.

The group spans training rank 0 (group rank 0, the source) and every rollout worker (ranks 1..N). It is built
directly from a ``TCPStore`` rather than through ``init_process_group``, so it can coexist with each side's own
default group (the trainer's data-parallel group; vLLM's or Megatron's groups later). Backend: gloo on CPU, NCCL
when the tensors live on GPUs.

Parameters are packed into flat buckets of at most ``bucket_bytes`` (one dtype per bucket; a tensor larger than a
bucket gets a bucket of its own), one broadcast per bucket. A header broadcast first carries the version and the
bucket count, so a receiver that is out of step fails loudly instead of loading garbage. Before the header, the
sender announces the push in the group's store (``push/<n>``): receivers wait there, as long as it takes, and enter
the collective only for a push that is coming - a collective waited in would fail at ``sync.timeout_s``, and a
training step at long context can take longer than that between two pushes.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32": strings travel through Ray and JSON

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=getattr(torch, self.dtype), device="cpu").element_size()


def manifest_of(named: Iterable[tuple[str, torch.Tensor]]) -> list[TensorSpec]:
    return [TensorSpec(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in named]


def plan_buckets(manifest: list[TensorSpec], bucket_bytes: int) -> list[list[int]]:
    """Consecutive runs of tensor indices, each of one dtype and at most ``bucket_bytes`` (unless a lone tensor is
    bigger). Pure and deterministic: sender and receivers compute the same plan from the same manifest."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_bytes} bytes")
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, spec in enumerate(manifest):
        fits = current and manifest[current[0]].dtype == spec.dtype and size + spec.nbytes <= bucket_bytes
        if current and not fits:
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += spec.nbytes
    if current:
        buckets.append(current)
    return buckets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` (on this node) is still running: not exited, not a zombie."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def check_arrival(name: str, tensor: torch.Tensor, spec: TensorSpec, position: int) -> None:
    """A sender's tensor at ``position`` is the manifest's (the receivers plan their buckets from the manifest)."""
    if (name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")) != (spec.name, spec.shape, spec.dtype):
        raise RuntimeError(f"weight sync: expected {spec} at position {position}, the trainer gave {name} "
                           f"{tuple(tensor.shape)} {tensor.dtype}")


def check_exhausted(arriving: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Nothing beyond the manifest (and a generator whose last step is collective, e.g. a sharded export, ends)."""
    for name, _ in arriving:
        raise RuntimeError(f"weight sync: the trainer gave {name}, which is not in the manifest")


def wait_key(store, key: str, retired=lambda: False) -> bytes:
    """``key``'s value in ``store`` once someone sets it, however long that takes (past the store's own timeout),
    unless ``retired()`` says the waiter is no longer wanted. A store whose owner died raises."""
    while True:
        try:
            store.wait([key])
            return store.get(key)
        except Exception:  # DistStoreError at the store's timeout; a dead store raises again below
            if retired():
                raise
            if store.check([key]):
                return store.get(key)


def nccl_options(timeout: timedelta):
    """``ProcessGroupNCCL`` options with ``timeout`` (its constructor takes no timeout of its own: without options
    the group gets NCCL's default of 10 minutes whatever ``sync.timeout_s`` says)."""
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return options


class BroadcastGroup:
    """One member of the sync group. Rank 0 sends; every other rank receives."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, *, backend: str, timeout_s: float,
                 device: torch.device | None = None):
        """``device``: the CUDA device NCCL buffers live on (default: this thread's current one; a thread other
        than the one that chose the device must pass it, as a new thread starts on device 0)."""
        timeout = timedelta(seconds=timeout_s)
        self.rank, self.world_size, self.backend, self.timeout = rank, world_size, backend, timeout
        self._send_buffers: dict[torch.dtype, torch.Tensor] = {}
        self._pushes = 0  # pushes sent / waited for on this group (the announcement key's number)
        self.store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout)
        if backend == "gloo":
            self.pg = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)
            self.device = torch.device("cpu")
        elif backend == "nccl":
            self.pg = dist.ProcessGroupNCCL(self.store, rank, world_size, nccl_options(2 * timeout))
            self.device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
        else:
            raise ValueError(f"unknown sync backend {backend!r}; choose gloo or nccl")

    def _broadcast(self, tensor: torch.Tensor) -> None:
        """One collective, waited for on this thread for at most ``sync.timeout_s``. Gloo fails the wait itself at
        its timeout. An NCCL wait only makes the current CUDA stream wait, and a peer that died leaves the kernel
        spinning until NCCL's watchdog tears the process down (the trainer's rank 0 with it); a wait given a timeout
        blocks the thread instead and raises when it passes - the same failure gloo gives, so the owner retires the
        group (``GroupMembership``, which aborts an NCCL communicator) and re-forms it. NCCL's own timeout is set
        to twice this: the watchdog stays the last resort."""
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        work = self.pg.broadcast([tensor], opts)
        if self.backend == "nccl":
            work.wait(self.timeout)
        else:
            work.wait()

    def abort(self) -> None:
        """Abort an NCCL communicator (its pending kernels fail and free the stream); gloo has no abort."""
        if self.backend == "nccl":
            self.pg.abort()

    def _header(self, version: int, num_buckets: int) -> tuple[int, int]:
        header = torch.tensor([version, num_buckets], dtype=torch.int64, device=self.device)
        self._broadcast(header)
        return int(header[0]), int(header[1])

    def send(self, named: Iterable[tuple[str, torch.Tensor]], manifest: list[TensorSpec], bucket_bytes: int,
             version: int) -> int:
        """Broadcast all tensors (rank 0), which ``named`` yields in ``manifest`` order; returns the bytes sent.

        Streamed: a bucket is sent as soon as its tensors have arrived, and ``named`` is read no further ahead
        than one bucket, so a sharded model gathered tensor by tensor (the Megatron engine) never exists whole."""
        buckets = plan_buckets(manifest, bucket_bytes)
        self.store.set(f"push/{self._pushes}", str(version))
        self._pushes += 1
        self._header(version, len(buckets))
        arriving = iter(named)
        sent = 0
        for bucket in buckets:
            parts = []
            for i in bucket:
                name, tensor = next(arriving)
                check_arrival(name, tensor, manifest[i], i)
                parts.append(tensor.reshape(-1).to(self.device))
            if len(parts) == 1 and parts[0].is_contiguous():
                flat = parts[0]  # a bucket of one tensor goes as it is (a view: no copy)
            else:
                flat = self._send_buffer(parts[0].dtype, sum(p.numel() for p in parts))
                torch.cat(parts, out=flat)
            self._broadcast(flat)
            sent += flat.numel() * flat.element_size()
        check_exhausted(arriving)
        return sent

    def _send_buffer(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """A flat buffer of ``numel`` elements, the same memory for every bucket and version (one per dtype): a
        fresh bucket each time costs a page fault per 4 KiB on CPU (4-6x a raw broadcast's time, measured)."""
        buf = self._send_buffers.get(dtype)
        if buf is None or buf.numel() < numel:
            buf = self._send_buffers[dtype] = torch.empty(numel, dtype=dtype, device=self.device)
        return buf[:numel]

    def receive(self, manifest: list[TensorSpec], bucket_bytes: int, version: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` as buckets arrive (rank > 0); the caller loads them while the next one flies."""
        got_version, arriving = self.receive_next(manifest, bucket_bytes)
        if got_version != version:
            raise RuntimeError(f"weight sync out of step: expected version {version}, sender announced {got_version}")
        return arriving

    def receive_next(self, manifest: list[TensorSpec], bucket_bytes: int, empty=None, keep=None,
                     retired=lambda: False) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
        """Wait for the next broadcast (rank > 0), as long as it takes (``wait_key``): the version its header
        announces, and its ``(name, tensor)`` pairs, yielded as buckets arrive (views of the bucket).
        ``empty(numel, dtype)`` gives the memory a bucket is received into (default: a fresh tensor on this group's
        device); ``keep(flat)`` what the pairs are views of (default: that same tensor; e.g. a host copy of a GPU
        bucket)."""
        buckets = plan_buckets(manifest, bucket_bytes)
        wait_key(self.store, f"push/{self._pushes}", retired)
        self._pushes += 1
        got_version, got_buckets = self._header(-1, len(buckets))
        if got_buckets != len(buckets):
            raise RuntimeError(f"weight sync out of step: expected {len(buckets)} buckets, sender announced "
                               f"{got_buckets} (version {got_version})")
        return got_version, self._buckets(manifest, buckets, empty, keep)

    def _buckets(self, manifest: list[TensorSpec], buckets: list[list[int]], empty, keep
                 ) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in buckets:
            specs = [manifest[i] for i in bucket]
            numel, dtype = sum(s.numel for s in specs), getattr(torch, specs[0].dtype)
            flat = empty(numel, dtype) if empty else torch.empty(numel, dtype=dtype, device=self.device)
            self._broadcast(flat)
            if keep is not None:
                flat = keep(flat)
            offset = 0
            for spec in specs:
                yield spec.name, flat[offset : offset + spec.numel].view(spec.shape)
                offset += spec.numel


class GroupMembership:
    """The current sync group of one process, and the ones it replaced.

    When a member dies, the group is re-formed on a new store/port. The old group is *retired*, not destroyed: a
    gloo/NCCL group's destructor waits for its pending collectives, and a survivor's receive from the broken
    broadcast is pending until its timeout. Dropping it would block the very thread that joins the new group.
    """

    def __init__(self):
        self.group: BroadcastGroup | None = None
        self._retired: list[BroadcastGroup] = []

    def join(self, host: str, port: int, rank: int, world_size: int, *, backend: str, timeout_s: float) -> None:
        if self.group is not None:
            self.group.abort()  # (NCCL: its kernels would hold the CUDA stream the new group's broadcasts run on)
            self._retired.append(self.group)
        self.group = BroadcastGroup(host, port, rank, world_size, backend=backend, timeout_s=timeout_s)
