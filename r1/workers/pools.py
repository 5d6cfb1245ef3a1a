"""The training pool and the rollout pool: Ray actors in two separate placement groups, plus the sync group.

Keeping the pools apart is what lets them run different engines, scale independently and overlap (asynchronous
GRPO). ``rollout.placement=colocated`` instead puts rollout worker i in training rank i's bundle, on its GPU (Ray
gives each half of it: both see the same device), for one node or one GPU; the weight sync then hands each engine
its rank's memory rather than broadcasting (``r1.workers.weight_sync``). Each pool fans a call out to its actors
and gathers the results in order. The pools hold their actors; when a rollout worker is replaced or drained, and
what becomes of its work and of the sync group, is decided in one place: ``r1.workers.lifecycle``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import ray
import torch
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from r1.types import SamplingParams, TrainBatch
from r1.workers.rollout_worker import RolloutWorker
from r1.workers.train_worker import TrainWorker


def pool_bundles(num_workers: int, cpus: float, gpus: float, tag: str | None = None) -> list[dict[str, float]]:
    """One bundle per worker; with ``tag``, each also asks for one unit of the node resource naming the pool's nodes
    (a Slurm job starts each node's Ray with ``{"r1_pool_train": 1000}`` or ``{"r1_pool_rollout": 1000}``)."""
    bundle = {"CPU": cpus}
    if gpus > 0:
        bundle["GPU"] = gpus
    if tag:
        bundle[tag] = 1
    return [dict(bundle) for _ in range(num_workers)]


def pool_tag(cfg, pool: str) -> str | None:
    """The node resource of ``pool`` ("train" / "rollout") where each pool has nodes of its own (a Slurm job's nodes,
    a Kubernetes worker group's pods)."""
    return f"r1_pool_{pool}" if cfg.cluster.kind in ("slurm", "k8s") else None


def nodes_of(pg) -> list[str]:
    """The IP address of the node of each bundle of a placement group (what a run records as its layout)."""
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    table = ray.util.placement_group_table(pg)["bundles_to_node_id"]
    return [ips.get(table[i], "?") for i in sorted(table)]


log = logging.getLogger(__name__)

REQUESTS_IN_FLIGHT = 1000  # per rollout worker: far more than a step's requests; the engine batches them

# glibc malloc for training workers: one arena, no trimming, no mmap for large blocks. A training step allocates and
# frees the same large activations every micro-batch; by default glibc hands them back to the kernel (mmap'd blocks,
# trimmed thread arenas) and every step faults them in again page by page: 60-100K page faults and 20-25% of the
# step's compute on the project's 2-core VM (benchmarks/RESULTS.md). The worker's methods run on Ray's threads,
# which would each get a secondary arena of at most 64 MiB, too small to keep those blocks: hence one arena.
TRAIN_WORKER_ENV = {
    "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**40),
}


def _make_placement_group(num_workers: int, cpus: float, gpus: float, strategy: str, name: str,
                          tag: str | None = None):
    pg = placement_group(pool_bundles(num_workers, cpus, gpus, tag), strategy=strategy, name=name)
    ray.get(pg.ready(), timeout=300)
    return pg


def _spawn(remote_cls, pg, index: int, cpus: float, gpus: float, args, max_concurrency: int = 2,
           env: dict[str, str] | None = None):
    return remote_cls.options(
        num_cpus=cpus, num_gpus=gpus, max_concurrency=max_concurrency,
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index),
        **({"runtime_env": {"env_vars": env}} if env else {}),  # (merged with the job's own env_vars)
    ).remote(*args)


def ranks_by_node(bundle_nodes: dict[int, str]) -> list[int]:
    """The bundle of each rank: a node's bundles consecutive (nodes in the order of their first bundle, bundles in
    index order). Ray numbers a placement group's bundles in request order, not by node: with SPREAD, or on a
    cluster whose free GPUs are scattered, bundle 1 may sit on another node than 0 and 2. Megatron makes tensor-
    parallel groups of consecutive ranks, and a TP group split over nodes all-reduces every layer over the network."""
    by_node: dict[str, list[int]] = {}
    for bundle in sorted(bundle_nodes):
        by_node.setdefault(bundle_nodes[bundle], []).append(bundle)
    return [b for bundles in by_node.values() for b in bundles]


def check_groups_within_nodes(bundle_nodes: dict[int, str], group: int) -> None:
    """Refuse a training pool whose nodes hold ranks that are not whole tensor-parallel groups."""
    counts = Counter(bundle_nodes.values())
    if group > 1 and any(c % group for c in counts.values()):
        raise ValueError(
            f"trainer.megatron.tensor_parallel={group}: the ranks of a tensor-parallel group must share a node, but the "
            f"training pool's GPUs fell {sorted(counts.values(), reverse=True)} to a node. Give the pool whole nodes "
            f"(trainer.num_workers a multiple of the GPUs per node, cluster.placement_strategy=PACK or STRICT_PACK), "
            f"or a tensor_parallel that divides each node's share")


def _make_actors(cls, num_workers: int, cpus: float, gpus: float, strategy: str, name: str, make_args,
                 env: dict[str, str] | None = None, tag: str | None = None, group: int = 1,
                 bundle: tuple[float, float] | None = None):
    """The pool's placement group, one actor per rank, ranks ordered by node (``ranks_by_node``), and each rank's
    bundle. ``bundle``: (CPUs, GPUs) of each bundle when it holds more than the rank (a colocated engine)."""
    bundle_cpus, bundle_gpus = bundle or (cpus, gpus)
    pg = _make_placement_group(num_workers, bundle_cpus, bundle_gpus, strategy, name, tag)
    bundle_nodes = ray.util.placement_group_table(pg)["bundles_to_node_id"]
    if gpus > 0:
        try:
            check_groups_within_nodes(bundle_nodes, group)
        except ValueError:
            remove_placement_group(pg)
            raise
    remote_cls = ray.remote(cls)
    bundles = ranks_by_node(bundle_nodes)
    # three calls at once: the compute, a sync-group change while a broadcast is stuck, the watchdog's heartbeat
    return pg, [_spawn(remote_cls, pg, b, cpus, gpus, make_args(rank), max_concurrency=3, env=env)
                for rank, b in enumerate(bundles)], bundles


def colocated(cfg) -> bool:
    """Whether the rollout engines share the training ranks' bundles (a stage with a training pool only)."""
    return cfg.rollout.placement == "colocated"


def _colocated_share(gpus: float) -> float:
    """What each of the two actors sharing a colocated bundle asks Ray for: half its GPU (Ray then gives both
    the same device; the memory split is vLLM's gpu_memory_utilization), or nothing on CPU."""
    return gpus / 2


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
        t, r = cfg.trainer, cfg.rollout
        self.world_size = t.num_workers
        self.colocated = shared = colocated(cfg)  # each bundle also holds a rollout worker (RolloutPool(colocate_with=..))
        self.pg, self.actors, self.bundles = _make_actors(
            TrainWorker, t.num_workers, t.cpus_per_worker,
            _colocated_share(t.gpus_per_worker) if shared else t.gpus_per_worker, cfg.cluster.placement_strategy,
            f"r1-train-{cfg.name}", lambda i: (cfg, model_path, i, t.num_workers), env=TRAIN_WORKER_ENV,
            tag=pool_tag(cfg, "train"), group=t.megatron.tensor_parallel if t.engine == "megatron" else 1,
            bundle=(t.cpus_per_worker + r.cpus_per_worker, t.gpus_per_worker) if shared else None,
        )
        addr, port = ray.get(self.actors[0].address.remote())
        ray.get([a.setup.remote(addr, port) for a in self.actors])
        layout = ray.get([a.data_parallel.remote() for a in self.actors])
        self.dp_rank = [rank for rank, _, _ in layout]  # of each actor
        self.dp_size, self.collective = layout[0][1], layout[0][2]
        # one actor per DP rank answers for its shard (the ranks that split a model between them agree)
        self.dp_leaders = [self.dp_rank.index(d) for d in range(self.dp_size)]
        self.seconds = dict.fromkeys(("forward_s", "backward_s", "optimizer_s", "ray_s"), 0.0)

    @property
    def leader(self):
        return self.actors[0]

    def _shards(self, batch: TrainBatch) -> list[TrainBatch]:
        """Each actor's part of ``batch``: split over data-parallel ranks only (the tensor/pipeline-parallel ranks
        of one DP rank take the same rows)."""
        index = split_evenly(list(range(len(batch))), self.dp_size)
        shards = [batch.select(torch.tensor(ix, dtype=torch.long)) for ix in index]
        return [shards[d] for d in self.dp_rank]

    def compute_logprobs(self, batch: TrainBatch, *, temperature: float, reference: bool) -> torch.Tensor:
        start = time.perf_counter()
        parts = ray.get(
            [a.compute_logprobs.remote(s, temperature, reference) for a, s in zip(self.actors, self._shards(batch))]
        )
        worker_s = max(s for _, s in parts)
        self._account(time.perf_counter() - start, worker_s, forward_s=worker_s)
        return torch.cat([parts[i][0] for i in self.dp_leaders], dim=0)

    def train_step(self, batch: TrainBatch, loss_fn) -> dict[str, float]:
        """Stats of the step (already all-reduced across ranks; ``*_s`` timings are rank 0's)."""
        start = time.perf_counter()
        stats = ray.get([a.train_step.remote(s, loss_fn) for a, s in zip(self.actors, self._shards(batch))])
        worker_s = max(s.pop("worker_s") for s in stats)
        self._account(time.perf_counter() - start, worker_s,
                      **{k: stats[0].pop(k) for k in ("forward_s", "backward_s", "optimizer_s")})
        return stats[0]

    def _account(self, call_s: float, worker_s: float, **parts: float) -> None:
        self.seconds["ray_s"] += call_s - worker_s
        for k, v in parts.items():
            self.seconds[k] += v

    def pop_seconds(self) -> dict[str, float]:
        """Seconds since the last call: the trainer's forward passes, backward, optimizer (rank 0's clock) and the
        Ray round trips around them (a call's driver time minus its slowest rank's time)."""
        out, self.seconds = self.seconds, dict.fromkeys(self.seconds, 0.0)
        return out

    def update_reference(self) -> None:
        ray.get([a.update_reference.remote() for a in self.actors])

    def manifest(self):
        """Names, shapes and dtypes of what ``broadcast_weights`` sends (each rank that may send keeps it)."""
        actors = self.actors if self.collective or self.colocated else [self.leader]
        return ray.get([a.manifest.remote() for a in actors])[0]

    def broadcast_weights(self, version: int, senders: list[int] | None = None) -> list:
        """Start sending ``version`` to the sync group from rank 0, or from each rank in ``senders`` (colocated
        engines: each gets its own rank's copy); the ObjectRefs of the ranks taking part (their results: bytes
        sent). With a sharded model every rank takes part (it gathers)."""
        ranks = range(self.world_size) if self.collective else (senders or [0])
        return [self.actors[r].broadcast_weights.remote(version) for r in ranks]

    def save(self, path: str, with_optimizer: bool) -> None:
        ray.get([a.save.remote(path, with_optimizer) for a in self.actors])

    def load(self, path: str) -> None:
        ray.get([a.load.remote(path) for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)


class RolloutPool:
    """Rollout workers; each keeps many generation requests in flight (asyncio actors) plus weight sync."""

    def __init__(self, cfg, model_path: str, colocate_with: TrainPool | None = None):
        """``colocate_with``: the training pool whose bundles the workers share (worker i: rank i's), else a
        placement group of the pool's own."""
        r = cfg.rollout
        self.cfg, self.model_path = cfg, model_path
        self.colocated = colocate_with is not None
        if self.colocated:
            self.pg, self.bundles = colocate_with.pg, colocate_with.bundles[: r.num_workers]
        else:
            self.pg = _make_placement_group(
                r.num_workers, r.cpus_per_worker, r.gpus_per_worker, cfg.cluster.placement_strategy,
                f"r1-rollout-{cfg.name}", tag=pool_tag(cfg, "rollout"),
            )
            self.bundles = list(range(r.num_workers))
        # one asyncio event loop serves generation and weight sync (many calls at once: sync calls only wait, on
        # threads, for what the engine's own processes receive)
        self._remote_cls = ray.remote(RolloutWorker)
        self.reward_models = None  # the reward_model term's replicas (all-scenario RL), shared by the workers
        if any(t.name == "reward_model" for t in cfg.reward.terms):
            from r1.inputs import prepare_reward_model
            from r1.rewards.reward_model import RewardModelPool

            self.reward_models = RewardModelPool(cfg, prepare_reward_model(cfg))
        self.actors = [self._spawn(i) for i in range(r.num_workers)]
        self.replaced = 0
        self.drained: set[int] = set()

    @property
    def live(self) -> list[int]:
        """The workers that take work: all but the drained ones."""
        return [i for i in range(len(self.actors)) if i not in self.drained]

    def _spawn(self, index: int):
        r = self.cfg.rollout
        gpus = _colocated_share(r.gpus_per_worker) if self.colocated else r.gpus_per_worker
        return _spawn(self._remote_cls, self.pg, self.bundles[index], r.cpus_per_worker, gpus,
                      (self.cfg, self.model_path, index, self.reward_models and self.reward_models.actors),
                      max_concurrency=REQUESTS_IN_FLIGHT)

    def submit(self, worker: int, problems, params: SamplingParams, uids: list[int], version: int):
        """Queue one generation request on ``worker``, to be generated with policy ``version``; returns its
        ObjectRef (``Rollouts``: the groups, and the worker's totals)."""
        return self.actors[worker].generate_groups.remote(problems, params, uids, version)

    def retire(self, index: int) -> None:
        """Stop worker ``index`` for good (drained: ``WorkerLifecycle.drain``); its requests in flight fail."""
        self.drained.add(index)
        ray.kill(self.actors[index], no_restart=True)

    def respawn(self, dead: list[int]) -> list[int]:
        """Start fresh workers in the dead ones' bundles (not drained ones: their failures are expected); returns
        the indices respawned. Who decides, and re-forms the sync group after: ``r1.workers.lifecycle``."""
        dead = [i for i in dead if i not in self.drained]
        for i in dead:
            log.warning("rollout worker %d died; replacing it (its in-flight requests will be redone)", i)
            ray.kill(self.actors[i], no_restart=True)
            self.actors[i] = self._spawn(i)
            self.replaced += 1
        return dead

    def shutdown(self) -> None:
        try:
            ray.get([a.shutdown.remote() for a in self.actors], timeout=30)
        except (RayActorError, ray.exceptions.GetTimeoutError):
            pass  # a dead or stuck worker is killed below anyway
        for a in self.actors:
            ray.kill(a)
        if self.reward_models is not None:
            self.reward_models.shutdown()
        if not self.colocated:  # (a colocated pool's bundles are the training pool's)
            remove_placement_group(self.pg)
