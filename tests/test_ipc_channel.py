"""The colocated placement's weight transport between real processes: the test process is the trainer rank that
sends (it hosts the group's store), each member a Ray actor process running a ``StagedReceiver`` as a vLLM worker
does. On CPU the handles name POSIX shared memory; on GPUs the same code hands out CUDA IPC handles
(tests/test_gpu.py)."""

import os
import signal
from datetime import timedelta

import psutil
import pytest
import torch
import torch.distributed as dist

from r1.distributed.bucketed_broadcast import free_port, manifest_of, plan_buckets
from r1.distributed.ipc_channel import IpcSender, MemberDied, open_shared, share, shared_buffer
from r1.distributed.staged_receiver import StagedReceiver, SyncSpec, SyncWatch

CPU = torch.device("cpu")
BUCKET = 1024  # bytes: "head" (12 KiB) is bigger than a bucket, so the buffer grows (and is shared anew) mid-push


def _weights(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [("embed", torch.randn(40, 8, generator=gen)), ("layer.w", torch.randn(8, 8, generator=gen)),
            ("head", torch.randn(96, 32, generator=gen)), ("half", torch.randn(8, generator=gen).to(torch.bfloat16))]


class Member:
    """A process serving the weights (what a vLLM worker is), receiving through the IPC transport."""

    def __init__(self, spec: dict, rank: int):
        self.receiver = StagedReceiver(SyncSpec.from_dict(spec), rank, backend="gloo", device=torch.device("cpu"))

    def pid(self) -> int:
        return os.getpid()

    def take(self, version: int):
        weights, release = self.receiver.take(version, timeout_s=30)
        out = [(n, t.clone()) for n, t in weights]
        release()
        return out


def _group(ray, members: int):
    """The sender (this process, rank 0's store) and ``members`` actors at ranks 1.. on it."""
    host, port = "127.0.0.1", free_port()
    store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    spec = SyncSpec(host, port, 1 + members, 1, manifest_of(_weights(0)), BUCKET, 30.0, "ipc", source=0)
    actors = [ray.remote(num_cpus=0.5)(Member).remote(spec.as_dict(), rank) for rank in range(1, 1 + members)]
    SyncWatch(spec, members).wait_joined(lambda: None)
    return IpcSender(store, 0, list(range(1, 1 + members)), CPU, timeout_s=30.0), spec, actors


def _equal(got, want):
    return [n for n, _ in got] == [n for n, _ in want] and all(
        a.dtype == b.dtype and torch.equal(a, b) for (_, a), (_, b) in zip(got, want))


def test_a_shared_buffer_is_the_same_memory_in_another_process(ray_local):
    buffer = shared_buffer(64, CPU)
    buffer.copy_(torch.arange(64, dtype=torch.uint8))
    handle = share(buffer)

    def double_it(handle):
        from r1.distributed.ipc_channel import open_shared

        mapped = open_shared(handle, torch.device("cpu"))
        mapped.mul_(2)  # written in place: the sender sees it, nothing was copied
        return os.getpid()

    assert ray_local.get(ray_local.remote(num_cpus=0.5)(double_it).remote(handle)) != os.getpid()
    assert torch.equal(buffer, torch.arange(64, dtype=torch.uint8) * 2)
    assert torch.equal(open_shared(handle, CPU), buffer)


def test_every_member_stages_every_version_bit_for_bit(ray_local):
    sender, spec, actors = _group(ray_local, members=2)
    v1, v2 = _weights(1), _weights(2)
    assert len(plan_buckets(spec.manifest, BUCKET)) > 3
    assert sender.send(iter(v1), spec.manifest, BUCKET, 1) == sum(s.nbytes for s in spec.manifest)
    assert sender.send(iter(v2), spec.manifest, BUCKET, 2) == sum(s.nbytes for s in spec.manifest)
    for actor in actors:  # a member stages what it is handed (its own copy): version 1 is intact after 2 was sent
        assert _equal(ray_local.get(actor.take.remote(1)), v1)
        assert _equal(ray_local.get(actor.take.remote(2)), v2)


def test_a_member_killed_mid_push_fails_the_push_at_once(ray_local):
    """The sender watches its members' processes while it waits for their copies: a member killed after the first
    bucket fails the push with ``MemberDied`` (the weight sync then replaces its engine), long before
    ``sync.timeout_s``, and the surviving member is not left with a half-staged version."""
    sender, spec, actors = _group(ray_local, members=2)
    victim = psutil.Process(ray_local.get(actors[1].pid.remote()))
    produced = []

    def weights_killing_after_the_first_bucket():
        for i, pair in enumerate(_weights(1)):
            if i == len(plan_buckets(spec.manifest, BUCKET)[0]):  # every member has copied bucket 0 by now
                victim.send_signal(signal.SIGKILL)
                victim.wait(timeout=30)
            produced.append(pair[0])
            yield pair

    sender.timeout_s = 3600.0  # (were the death not noticed, the test would hang visibly, not pass)
    with pytest.raises(MemberDied, match="rank 2"):
        sender.send(weights_killing_after_the_first_bucket(), spec.manifest, BUCKET, 1)
    assert 0 < len(produced) < len(spec.manifest)
    assert 1 not in ray_local.get(actors[0].__ray_call__.remote(lambda m: list(m.receiver._staged)))
