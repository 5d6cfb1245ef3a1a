"""Bucketed trainer -> rollout broadcast over a real gloo group between Ray actors: bit-exact, versioned."""

import pytest
import torch

from r1.distributed.bucketed_broadcast import BroadcastGroup, TensorSpec, free_port, manifest_of, plan_buckets


def test_bucket_plan_respects_size_dtype_and_oversized_tensors():
    m = [
        TensorSpec("a", (10,), "float32"),  # 40 B
        TensorSpec("b", (10,), "float32"),  # 40 B
        TensorSpec("big", (100,), "float32"),  # 400 B > bucket
        TensorSpec("c", (5,), "float32"),
        TensorSpec("h", (5,), "bfloat16"),  # dtype change starts a bucket
    ]
    assert plan_buckets(m, 100) == [[0, 1], [2], [3], [4]]
    assert plan_buckets(m, 10_000) == [[0, 1, 2, 3], [4]]
    with pytest.raises(ValueError):
        plan_buckets(m, 0)


class Member:
    """A Ray actor holding random tensors (the sender) or zeros (receivers) of the same shapes."""

    def __init__(self, rank: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        shapes = {"embed": (50, 16), "layer.w": (16, 16), "layer.b": (16,), "head": (300, 16)}
        self.rank = rank
        self.tensors = {n: torch.randn(s, generator=gen) if rank == 0 else torch.zeros(s) for n, s in shapes.items()}
        self.tensors["half"] = self.tensors["layer.b"].to(torch.bfloat16) + 1

    def manifest(self):
        return manifest_of(self.tensors.items())

    def join(self, host, port, world):
        self.group = BroadcastGroup(host, port, self.rank, world, backend="gloo", timeout_s=60)

    def send(self, bucket_bytes, version):
        return self.group.send(self.tensors.items(), manifest_of(self.tensors.items()), bucket_bytes, version)

    def send_streamed(self, bucket_bytes, version):
        """Send from a generator; for each tensor, how many broadcasts had gone out when it was produced."""
        sent_before, broadcast = [], self.group._broadcast
        calls = []
        self.group._broadcast = lambda t: (calls.append(1), broadcast(t))

        def produce():
            for name, tensor in self.tensors.items():
                sent_before.append(len(calls))
                yield name, tensor

        self.group.send(produce(), manifest_of(self.tensors.items()), bucket_bytes, version)
        self.group._broadcast = broadcast
        return sent_before

    def receive(self, manifest, bucket_bytes, version):
        for name, tensor in self.group.receive(manifest, bucket_bytes, version):
            self.tensors[name].copy_(tensor)

    def get(self):
        return self.tensors


@pytest.mark.parametrize("bucket_bytes", [1024, 1 << 20])  # 1 KiB: "head" (19 KiB) is larger than a bucket
def test_broadcast_is_bit_exact_across_actors(ray_local, bucket_bytes):
    ray = ray_local
    Actor = ray.remote(num_cpus=0.5)(Member)
    sender, *receivers = [Actor.remote(r, seed=7) for r in range(3)]
    port = free_port()
    ray.get([a.join.remote("127.0.0.1", port, 3) for a in [sender, *receivers]])
    manifest = ray.get(sender.manifest.remote())
    assert len(plan_buckets(manifest, bucket_bytes)) > (3 if bucket_bytes == 1024 else 1)
    for version in (1, 2):
        sent = sender.send.remote(bucket_bytes, version)
        ray.get([r.receive.remote(manifest, bucket_bytes, version) for r in receivers])
        assert ray.get(sent) == sum(s.nbytes for s in manifest)
    want = ray.get(sender.get.remote())
    for r in receivers:
        got = ray.get(r.get.remote())
        for name in want:
            assert got[name].dtype == want[name].dtype
            assert torch.equal(got[name], want[name])  # same dtype, no NaNs: equal means bit-identical
    for a in [sender, *receivers]:
        ray.kill(a)


def test_the_sender_streams_one_bucket_at_a_time(ray_local):
    """A tensor is asked for only once the buckets before its own have gone out (the header is broadcast 0): the
    sender never holds more than one bucket of a model that is gathered tensor by tensor."""
    ray = ray_local
    Actor = ray.remote(num_cpus=0.5)(Member)
    sender, receiver = [Actor.remote(r, seed=7) for r in range(2)]
    port = free_port()
    ray.get([a.join.remote("127.0.0.1", port, 2) for a in [sender, receiver]])
    manifest = ray.get(sender.manifest.remote())
    bucket_bytes = 1200  # embed 3200 B alone; layer.w 1024 + layer.b 64 together; head alone; half (bf16) alone
    buckets = plan_buckets(manifest, bucket_bytes)
    assert buckets == [[0], [1, 2], [3], [4]]
    sent = sender.send_streamed.remote(bucket_bytes, 1)
    ray.get(receiver.receive.remote(manifest, bucket_bytes, 1))
    assert ray.get(sent) == [1, 2, 2, 3, 4]  # header, then one broadcast per finished bucket
    want, got = ray.get(sender.get.remote()), ray.get(receiver.get.remote())
    assert all(torch.equal(want[n], got[n]) for n in want)
    for a in [sender, receiver]:
        ray.kill(a)


def test_version_mismatch_fails_loudly(ray_local):
    ray = ray_local
    Actor = ray.remote(num_cpus=0.5)(Member)
    sender, receiver = Actor.remote(0, 1), Actor.remote(1, 1)
    port = free_port()
    ray.get([a.join.remote("127.0.0.1", port, 2) for a in (sender, receiver)])
    manifest = ray.get(sender.manifest.remote())
    sent = sender.send.remote(1 << 20, 5)
    with pytest.raises(ray.exceptions.RayTaskError, match="out of step"):
        ray.get(receiver.receive.remote(manifest, 1 << 20, 4))
    ray.kill(sender)
    ray.kill(receiver)
    del sent
