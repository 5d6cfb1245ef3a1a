"""The training pool's worker processes, against a plain Ray worker running the same step."""

import resource

import pytest
import ray
import torch

from r1.driver import make_loss
from r1.types import TrainBatch
from r1.workers.pools import TrainPool
from r1.workers.train_worker import TrainWorker
from tests.conftest import TINY, compose


def _minor_faults(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda _: resource.getrusage(resource.RUSAGE_SELF).ru_minflt))


def _faults_per_step(actor, batch, loss, steps: int = 3) -> float:
    for _ in range(2):  # the first steps allocate what a step needs (one call at a time, as the pool makes them)
        ray.get(actor.train_step.remote(batch, loss))
    before = _minor_faults(actor)
    for _ in range(steps):
        ray.get(actor.train_step.remote(batch, loss))
    return (_minor_faults(actor) - before) / steps


def test_training_workers_reuse_their_step_memory_instead_of_faulting_it_in_again(ray_local, tiny_model):
    """A step frees and re-allocates the same large activations; with glibc's defaults a Ray worker (whose methods
    run on threads with small secondary arenas) returns them to the kernel and faults them in again, page by page,
    every step. The pool's workers keep them (``TRAIN_WORKER_ENV``)."""
    cfg = compose(TINY + ["run_dir=unused", "algo.kl_coef=0", "trainer.micro_batch_size=64"])
    g = torch.Generator().manual_seed(0)
    rows, width = 64, 256
    ids = torch.randint(3, 200, (rows, width), generator=g)
    response = (torch.arange(width) >= 8).float().expand(rows, width).clone()
    batch = TrainBatch(ids, torch.ones_like(ids), response, torch.randn(rows, generator=g),
                       rollout_logprobs=-torch.rand(rows, width, generator=g) * response)
    loss = make_loss(cfg, width)

    pool = TrainPool(cfg, tiny_model)
    plain = ray.remote(TrainWorker).options(num_cpus=1, max_concurrency=2).remote(cfg, tiny_model, 0, 1)
    try:
        ray.get(plain.setup.remote("127.0.0.1", 0))
        tuned, default = _faults_per_step(pool.leader, batch, loss), _faults_per_step(plain, batch, loss)
    finally:
        ray.kill(plain)
        pool.shutdown()
    assert default > 2000, f"the reference worker should refault its activations ({default:.0f} faults per step)"
    # measured: ~2K vs ~33K when calls ran on Ray's threads; 4.4K vs 12K with one compute thread per worker
    assert tuned < default / 2, (tuned, default)


def _record_engine_threads(worker) -> None:
    """Make the worker note the native thread id of every engine call it makes from now on."""
    import threading

    worker.engine_threads = set()
    for name in ("train_step", "compute_logprobs", "update_reference", "save", "load"):
        call = getattr(worker.engine, name)

        def noted(*args, _call=call, **kwargs):
            worker.engine_threads.add(threading.get_native_id())
            return _call(*args, **kwargs)

        setattr(worker.engine, name, noted)


def test_every_torch_call_of_a_training_worker_runs_on_one_thread(ray_local, tiny_model, tmp_path):
    """Ray runs the actor's methods on a pool of threads; each thread that starts an OpenMP region gets a team of
    its own, and with more OpenMP threads than cores libgomp stops spinning between regions (a tiny update ran 1.4x
    slower, ~8K context switches/s). So the worker hands every engine call to one compute thread of its own."""
    cfg = compose(TINY + ["run_dir=unused", "trainer.torch_threads=2"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (8, 24), generator=g)
    response = (torch.arange(24) >= 8).float().expand(8, 24).clone()
    batch = TrainBatch(ids, torch.ones_like(ids), response, torch.randn(8, generator=g),
                       rollout_logprobs=-torch.rand(8, 24, generator=g) * response)
    loss = make_loss(cfg, 24)
    pool = TrainPool(cfg, tiny_model)
    try:
        ray.get(pool.leader.__ray_call__.remote(_record_engine_threads))
        for step in range(6):
            pool.compute_logprobs(batch, temperature=1.0, reference=True)
            pool.train_step(batch, loss)
            if step % 2:
                pool.update_reference()
        pool.save(str(tmp_path / "ckpt"), with_optimizer=True)
        pool.load(str(tmp_path / "ckpt"))
        threads = ray.get(pool.leader.__ray_call__.remote(lambda w: w.engine_threads))
        assert len(threads) == 1, f"engine calls ran on {len(threads)} threads: {threads}"
        torch_threads = ray.get(pool.leader.__ray_call__.remote(
            lambda w: w.compute_thread.submit(torch.get_num_threads).result()))
        assert torch_threads == 2  # trainer.torch_threads, on the thread that computes
    finally:
        pool.shutdown()


def test_ranks_are_ordered_by_node_so_a_tensor_parallel_group_shares_one():
    """Ray numbers bundles in request order: SPREAD over two nodes puts bundles 0 and 2 on one. Ranks go to a node's
    bundles consecutively, and a layout whose TP groups would straddle nodes is refused."""
    from r1.workers.pools import check_groups_within_nodes, ranks_by_node

    spread = {0: "node-a", 1: "node-b", 2: "node-a", 3: "node-b"}
    assert ranks_by_node(spread) == [0, 2, 1, 3]
    assert ranks_by_node({0: "x", 1: "x"}) == [0, 1]
    check_groups_within_nodes(spread, 2)
    with pytest.raises(ValueError, match=r"tensor_parallel=4: .* fell \[2, 2\] to a node"):
        check_groups_within_nodes(spread, 4)
