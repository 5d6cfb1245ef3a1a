"""The training pool and the rollout pool: Ray actors in two separate placement groups, plus the sync group.

Keeping the pools apart (not colocated) is what lets them run different engines, scale independently and, in the
asynchronous issue, overlap. Each pool fans a call out to its actors and gathers the results in order.
"""

from __future__ import annotations

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from r1.types import Group, SamplingParams, TrainBatch
from r1.workers.rollout_worker import RolloutWorker
from r1.workers.train_worker import TrainWorker


def pool_bundles(num_workers: int, cpus: float, gpus: float) -> list[dict[str, float]]:
    bundle = {"CPU": cpus}
    if gpus > 0:
        bundle["GPU"] = gpus
    return [dict(bundle) for _ in range(num_workers)]


def _make_actors(cls, num_workers: int, cpus: float, gpus: float, strategy: str, name: str, make_args):
    pg = placement_group(pool_bundles(num_workers, cpus, gpus), strategy=strategy, name=name)
    ray.get(pg.ready(), timeout=300)
    remote_cls = ray.remote(cls)
    actors = [
        remote_cls.options(
            num_cpus=cpus, num_gpus=gpus, max_concurrency=2,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
        ).remote(*make_args(i))
        for i in range(num_workers)
    ]
    return pg, actors


def split_evenly(items: list, parts: int) -> list[list]:
    """Contiguous, order-preserving split into ``parts`` chunks whose sizes differ by at most one."""
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


class TrainPool:
    def __init__(self, cfg, model_path: str):
        t = cfg.trainer
        self.world_size = t.num_workers
        self.pg, self.actors = _make_actors(
            TrainWorker, t.num_workers, t.cpus_per_worker, t.gpus_per_worker, cfg.cluster.placement_strategy,
            f"r1-train-{cfg.name}", lambda i: (cfg, model_path, i, t.num_workers),
        )
        addr, port = ray.get(self.actors[0].address.remote())
        ray.get([a.setup.remote(addr, port) for a in self.actors])

    @property
    def leader(self):
        return self.actors[0]

    def _shards(self, batch: TrainBatch) -> list[TrainBatch]:
        index = split_evenly(list(range(len(batch))), self.world_size)
        return [batch.select(torch.tensor(ix, dtype=torch.long)) for ix in index]

    def compute_logprobs(self, batch: TrainBatch, *, temperature: float, reference: bool) -> torch.Tensor:
        parts = ray.get(
            [a.compute_logprobs.remote(s, temperature, reference) for a, s in zip(self.actors, self._shards(batch))]
        )
        return torch.cat(parts, dim=0)

    def train_step(self, batch: TrainBatch, loss_fn) -> dict[str, float]:
        stats = ray.get([a.train_step.remote(s, loss_fn) for a, s in zip(self.actors, self._shards(batch))])
        return stats[0]  # already all-reduced across ranks

    def update_reference(self) -> None:
        ray.get([a.update_reference.remote() for a in self.actors])

    def save(self, path: str, with_optimizer: bool) -> None:
        ray.get([a.save.remote(path, with_optimizer) for a in self.actors])

    def load(self, path: str) -> None:
        ray.get([a.load.remote(path) for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)


class RolloutPool:
    def __init__(self, cfg, model_path: str):
        r = cfg.rollout
        self.pg, self.actors = _make_actors(
            RolloutWorker, r.num_workers, r.cpus_per_worker, r.gpus_per_worker, cfg.cluster.placement_strategy,
            f"r1-rollout-{cfg.name}", lambda i: (cfg, model_path, i),
        )

    def _fan_out(self, method: str, problems: list[tuple[int, str, str]], params: SamplingParams) -> list:
        chunks = split_evenly(problems, len(self.actors))
        futures = [
            getattr(a, method).remote(chunk, SamplingParams(**{**params.__dict__, "seed": params.seed * 1009 + i}))
            for i, (a, chunk) in enumerate(zip(self.actors, chunks)) if chunk
        ]
        return [item for part in ray.get(futures) for item in part]

    def generate(self, problems: list[tuple[int, str, str]], params: SamplingParams) -> list[Group]:
        return self._fan_out("generate_groups", problems, params)

    def evaluate(self, problems: list[tuple[int, str, str]], params: SamplingParams) -> list[dict]:
        return self._fan_out("evaluate", problems, params)

    def verifier_stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for stats in ray.get([a.verifier_stats.remote() for a in self.actors]):
            for k, v in stats.items():
                total[k] = total.get(k, 0) + v
        return total

    def shutdown(self) -> None:
        ray.get([a.shutdown.remote() for a in self.actors], timeout=30)
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)


class WeightSync:
    """Trainer rank 0 -> every rollout worker, one bucketed broadcast per sync."""

    def __init__(self, train: TrainPool, rollout: RolloutPool):
        self.train, self.rollout = train, rollout
        host, port = ray.get(train.leader.address.remote())
        world = 1 + len(rollout.actors)
        ray.get(
            [train.leader.init_sync.remote(host, port, world)]
            + [a.init_sync.remote(host, port, i + 1, world) for i, a in enumerate(rollout.actors)]
        )
        self.manifest = ray.get(train.leader.manifest.remote())

    def push(self, version: int) -> int:
        """Broadcast the trainer's weights as ``version``; returns bytes sent. All receivers load before return."""
        send = self.train.leader.broadcast_weights.remote(version)
        recvs = [a.receive_weights.remote(self.manifest, version) for a in self.rollout.actors]
        ray.get(recvs)
        return ray.get(send)
