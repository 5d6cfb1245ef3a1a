"""``rollout.placement=colocated``: each rollout engine in its training rank's bundle (on GPUs: its GPU), weights
handed over through shared memory by that rank - the transport the placement implies, no collective. Real Ray
pools, real HF engines, real shared memory between the worker processes."""

import threading
from datetime import timedelta

import psutil
import pytest
import ray
import torch
import torch.distributed as dist

from r1.config.validate import ConfigError, validate
from tests.conftest import TINY, compose, pools

COLOCATED = ["trainer.num_workers=2", "rollout.num_workers=2", "rollout.placement=colocated", "sync.bucket_mb=0.0005"]


def _gpu(actor) -> list[str]:
    """The GPU Ray gave ``actor`` (its CUDA_VISIBLE_DEVICES)."""
    return ray.get(actor.placement.remote())[1]


def _export(actor):
    return ray.get(actor.__ray_call__.remote(lambda w: [(n, t.clone()) for n, t in w.engine.named_weights()]))


def _perturb(actor, seed: int):  # "a training step" on one rank
    def step(w):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in w.engine.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))

    ray.get(actor.__ray_call__.remote(step))


def _equal(got, want):
    return [n for n, _ in got] == [n for n, _ in want] and all(
        a.dtype == b.dtype and torch.equal(a, b) for (_, a), (_, b) in zip(got, want))


def test_each_engine_shares_its_ranks_gpu_and_gets_that_ranks_weights_by_shared_memory(ray_with_gpus, cache_dir,
                                                                                      tmp_path):
    """Engine i runs on training rank i's GPU (declared GPUs: Ray's accounting is real, the devices are not, so
    the tensors stay on the CPU) and rank i sends it (each rank its own copy: on GPUs a CUDA IPC
    handle opens only on its own GPU); no collective group is formed. Ranks are made to hold different weights here
    (a data-parallel trainer's ranks agree; this shows who sent what): every engine serves its own rank's, bit for
    bit. A rollout worker killed while a push is in flight fails that push at once; it is replaced in the same
    place and serves the version pushed."""
    cfg = compose(TINY + COLOCATED + [f"cache_dir={cache_dir}", f"run_dir={tmp_path / 'run'}",
                                      "trainer.gpus_per_worker=1", "rollout.gpus_per_worker=1"])
    validate(cfg)
    from r1.inputs import prepare_model

    path = prepare_model(cfg)
    with pools(cfg, path) as (train, rollout, sync):
        assert sync.senders == [0, 1]
        gpus = [_gpu(a) for a in train.actors]
        assert [_gpu(a) for a in rollout.actors] == gpus and sorted(gpus) == [["0"], ["1"]]
        assert ray.get([a.__ray_call__.remote(lambda w: w.sync.group) for a in train.actors]) == [None, None]
        _perturb(train.actors[1], seed=1)
        exports = [_export(a) for a in train.actors]
        assert not _equal(exports[0], exports[1])
        assert sync.push(1) >= 2 * sum(t.numel() * t.element_size() for _, t in exports[0])
        for actor, export in zip(rollout.actors, exports):
            assert _equal(ray.get(actor.loaded_weights.remote()), export)

        host, port = sync.address
        store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=120))
        victim = psutil.Process(ray.get(rollout.actors[1].pid.remote()))
        killed = []

        def kill_once_the_push_is_announced():
            store.wait(["ipc/1/1/head"])  # rank 1's second push on this group: version 2
            victim.kill()
            killed.append(True)

        killer = threading.Thread(target=kill_once_the_push_is_announced)
        killer.start()
        _perturb(train.actors[0], seed=2)
        exports = [_export(a) for a in train.actors]
        assert sync.push(2) == 0  # (0: members died mid-push; the replacement got version 2 in a new group)
        killer.join()
        assert killed and rollout.replaced == 1
        assert _gpu(rollout.actors[1]) == gpus[1]
        for actor, export in zip(rollout.actors, exports):
            assert _equal(ray.get(actor.loaded_weights.remote()), export)


@pytest.mark.parametrize("override, message", [
    (["rollout.num_workers=3"], "rollout.num_workers=3 > trainer.num_workers=2"),
    (["rollout=vllm", "rollout.vllm.tensor_parallel_size=2"], "tensor_parallel_size=2 must be 1"),
    (["trainer.gpus_per_worker=1"], "set trainer.gpus_per_worker=1 and rollout.gpus_per_worker=1"),
    (["cluster=k8s"], "not supported on Kubernetes"),
])
def test_a_colocation_that_cannot_be_placed_is_a_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(TINY + COLOCATED + override))
