"""Weight sync between processes that share a device: the colocated placement's transport (no collective).

When a rollout engine runs on the training pool's GPUs (``rollout.placement=colocated``), the trainer rank on a GPU
and the vLLM worker on the same GPU need no network between them: the trainer packs a bucket into a buffer of its
own and hands the receiver a *handle* to that memory - a CUDA IPC handle on GPUs (the receiver maps the very same
device memory, no copy on the way), a POSIX shared-memory segment on CPU (the same code path, so CI runs it). Each
member copies the bucket out (on GPUs: device to its pinned host staging, as the broadcast path does) and says so;
then the trainer fills the buffer with the next bucket. Buckets, manifest and staging are those of the broadcast
path (``r1.distributed.bucketed_broadcast``, ``r1.distributed.staged_receiver``): only how a bucket crosses changes.

The control plane is the sync group's TCP store, keyed by the sending trainer rank ``s`` and its push count ``n``:
``ipc/s/n/head`` (version, buckets), ``ipc/s/n/b`` (bucket b's handle, as JSON: nothing is unpickled from the store),
``ipc/s/n/b/done/r`` (member r copied it). The sender watches its members' processes (``pid/r``, written when they
join; colocated members are on its node) while it waits, so a member that dies mid-push fails the push at once
rather than at ``sync.timeout_s``.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterable, Iterator

import torch

from r1.distributed.bucketed_broadcast import (
    TensorSpec,
    check_arrival,
    check_exhausted,
    plan_buckets,
    process_alive,
    wait_key,
)

POLL_S = 0.0005  # the sender's wait for its members' copies (a store check is ~25 us; a bucket copy is ms)


class MemberDied(RuntimeError):
    """A member (receiver) of an IPC push died before it copied a bucket out."""


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def share(buffer: torch.Tensor) -> dict:
    """A handle to ``buffer``'s memory (a 1-D byte tensor made by ``shared_buffer``) that another process on the
    same node (CPU) or the same GPU (CUDA) can open with ``open_shared``; plain JSON."""
    if buffer.device.type == "cuda":
        from torch.multiprocessing.reductions import reduce_tensor

        # reduce_tensor's args: (cls, size, stride, offset, storage_cls, dtype, device, handle, storage bytes,
        # storage offset, requires_grad, ref counter handle, ref counter offset, event handle, event sync)
        args = reduce_tensor(buffer)[1]
        return {"kind": "cuda", "uuid": str(torch.cuda.get_device_properties(buffer.device).uuid),
                "numel": buffer.numel(), "offset": args[3], "handle": _b64(args[7]), "storage_bytes": args[8],
                "storage_offset": args[9], "ref_handle": _b64(args[11]), "ref_offset": args[12],
                "event_handle": _b64(args[13]), "event_sync": args[14]}
    manager, name, size = buffer.untyped_storage()._share_filename_cpu_()
    return {"kind": "cpu", "manager": _b64(manager), "name": _b64(name), "size": size, "numel": buffer.numel()}


def shared_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """A 1-D byte tensor ``share`` can hand out: ordinary device memory on a GPU (CUDA IPC shares any allocation);
    on CPU, memory in a named shared-memory segment (torch's ``file_system`` sharing: another process opens it by
    name, no file descriptor passing between processes that are not parent and child)."""
    if device.type == "cuda":
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    storage = torch.UntypedStorage(nbytes)
    storage._share_filename_cpu_()
    return torch.empty(0, dtype=torch.uint8, device="cpu").set_(storage, 0, (nbytes,), (1,))


def open_shared(handle: dict, device: torch.device) -> torch.Tensor:
    """The byte tensor a ``share`` handle names, mapped into this process (no copy). CUDA: the device must be the
    very GPU the sender's buffer is on (by UUID: the two processes may number their visible GPUs differently)."""
    if handle["kind"] == "cpu":
        storage = torch.UntypedStorage._new_shared_filename_cpu(
            _unb64(handle["manager"]), _unb64(handle["name"]), handle["size"])
        return torch.empty(0, dtype=torch.uint8, device="cpu").set_(storage, 0, (handle["numel"],), (1,))
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = str(torch.cuda.get_device_properties(index).uuid)
    if uuid != handle["uuid"]:
        raise RuntimeError(f"colocated weight sync: this member's GPU {uuid} is not the sender's {handle['uuid']}; "
                           "a CUDA IPC handle opens only where its memory is (rollout.placement=colocated puts "
                           "each engine on its trainer rank's GPU)")
    return rebuild_cuda_tensor(
        torch.Tensor, torch.Size([handle["numel"]]), (1,), handle["offset"], torch.UntypedStorage, torch.uint8,
        index, _unb64(handle["handle"]), handle["storage_bytes"], handle["storage_offset"], False,
        _unb64(handle["ref_handle"]), handle["ref_offset"], _unb64(handle["event_handle"]), handle["event_sync"])


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


class IpcSender:
    """The trainer rank ``source``'s end: pushes versions to ``members`` (sync-group ranks on its device)."""

    def __init__(self, store, source: int, members: list[int], device: torch.device, timeout_s: float):
        self.store, self.source, self.members, self.device, self.timeout_s = store, source, members, device, timeout_s
        self._pushes = 0
        self._pids: dict[int, int] = {}  # of the members, by rank
        self._buffer: torch.Tensor | None = None
        self._handle: dict | None = None

    def _buffer_for(self, nbytes: int) -> tuple[torch.Tensor, dict]:
        """The one buffer every bucket of every version goes through (grown, and shared anew, for a bigger one)."""
        if self._buffer is None or self._buffer.numel() < nbytes:
            self._buffer = shared_buffer(nbytes, self.device)
            self._handle = share(self._buffer)
        return self._buffer, self._handle

    def send(self, named: Iterable[tuple[str, torch.Tensor]], manifest: list[TensorSpec], bucket_bytes: int,
             version: int) -> int:
        """Hand every bucket to the members, one after the other (``named`` in ``manifest`` order, read one bucket
        ahead at most); returns the bytes sent. ``MemberDied`` if a member dies, ``TimeoutError`` past
        ``sync.timeout_s``."""
        buckets = plan_buckets(manifest, bucket_bytes)
        n, self._pushes = self._pushes, self._pushes + 1
        prefix = f"ipc/{self.source}/{n}"
        self.store.set(f"{prefix}/head", json.dumps({"version": version, "buckets": len(buckets)}))
        arriving, sent = iter(named), 0
        for b, bucket in enumerate(buckets):
            specs = [manifest[i] for i in bucket]
            dtype = _dtype(specs[0].dtype)
            nbytes = sum(s.nbytes for s in specs)
            buffer, handle = self._buffer_for(nbytes)
            flat = buffer[:nbytes].view(dtype)
            offset = 0
            for i, spec in zip(bucket, specs):
                name, tensor = next(arriving)
                check_arrival(name, tensor, spec, i)
                flat[offset:offset + spec.numel].copy_(tensor.reshape(-1))
                offset += spec.numel
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # the bytes are there before anyone reads them
            self.store.set(f"{prefix}/{b}", json.dumps({"buffer": handle, "numel": offset, "dtype": specs[0].dtype}))
            self._wait_copied([f"{prefix}/{b}/done/{r}" for r in self.members], version)
            sent += nbytes
        check_exhausted(arriving)
        return sent

    def _wait_copied(self, keys: list[str], version: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        last_check = 0.0
        while not self.store.check(keys):
            now = time.monotonic()
            if now - last_check > 0.2:
                self._check_members(version)
                last_check = now
            if now > deadline:
                raise TimeoutError(f"weight sync (colocated): members {self.members} copied nothing of version "
                                   f"{version} for {self.timeout_s:.0f} s")
            time.sleep(POLL_S)

    def _check_members(self, version: int) -> None:
        for rank in self.members:
            if rank not in self._pids:  # (written once, when the member joined)
                self._pids[rank] = int(self.store.get(f"pid/{rank}"))
            pid = self._pids[rank]
            if not process_alive(pid):
                raise MemberDied(f"weight sync (colocated): member rank {rank} (pid {pid}) died during version "
                                 f"{version}")


class IpcReceiver:
    """A member's end: the buckets trainer rank ``source`` hands out, copied into memory the caller gives."""

    def __init__(self, store, rank: int, source: int, device: torch.device):
        self.store, self.rank, self.source, self.device = store, rank, source, device
        self._retired: Callable[[], bool] = lambda: False
        self._pushes = 0
        self._opened: tuple[str, torch.Tensor] | None = None  # (the handle's segment, its mapping)

    def receive_next(self, manifest: list[TensorSpec], bucket_bytes: int, empty, keep=None,
                     retired: Callable[[], bool] = lambda: False) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
        """Wait (as long as it takes, unless ``retired()``) for the sender's next push: its version and
        ``(name, tensor)`` pairs, views of the memory ``empty(numel, dtype)`` gives (host staging), yielded as
        buckets are copied. (``keep``: unused, the copy already lands in host memory.)"""
        n, self._pushes = self._pushes, self._pushes + 1
        prefix = f"ipc/{self.source}/{n}"
        self._retired = retired
        head = json.loads(self._get(f"{prefix}/head"))
        buckets = plan_buckets(manifest, bucket_bytes)
        if head["buckets"] != len(buckets):
            raise RuntimeError(f"weight sync out of step: expected {len(buckets)} buckets, sender announced "
                               f"{head['buckets']} (version {head['version']})")
        return head["version"], self._buckets(prefix, manifest, buckets, empty)

    def _buckets(self, prefix: str, manifest, buckets, empty) -> Iterator[tuple[str, torch.Tensor]]:
        for b, bucket in enumerate(buckets):
            specs = [manifest[i] for i in bucket]
            numel, dtype = sum(s.numel for s in specs), _dtype(specs[0].dtype)
            meta = json.loads(self._get(f"{prefix}/{b}"))
            if (meta["numel"], meta["dtype"]) != (numel, specs[0].dtype):
                raise RuntimeError(f"weight sync out of step: bucket {b} is {meta['numel']} x {meta['dtype']}, "
                                   f"expected {numel} x {specs[0].dtype}")
            shared = self._open(meta["buffer"])
            flat = empty(numel, dtype)
            flat.copy_(shared[: flat.numel() * flat.element_size()].view(dtype))  # (to pinned host: synchronous)
            self.store.set(f"{prefix}/{b}/done/{self.rank}", "1")
            offset = 0
            for spec in specs:
                yield spec.name, flat[offset: offset + spec.numel].view(spec.shape)
                offset += spec.numel

    def _open(self, handle: dict) -> torch.Tensor:
        key = handle.get("name") or handle.get("handle")
        if self._opened is None or self._opened[0] != key:
            self._opened = (key, open_shared(handle, self.device))
        return self._opened[1]

    def _get(self, key: str) -> bytes:
        # as long as it takes: a push per training step is minutes apart at long context, beyond the store timeout
        return wait_key(self.store, key, self._retired)

    def abort(self) -> None:
        """(Nothing to abort: no communicator; a wait on the store ends at its timeout.)"""
