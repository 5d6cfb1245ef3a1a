"""Connect the driver to Ray according to ``cfg.cluster``: a private instance (``local``) or a job's Ray cluster."""

from __future__ import annotations

import os
import time

import ray


def connect(cluster) -> bool:
    """Join or start Ray. Returns True if this call started it (the caller then owns its shutdown)."""
    if ray.is_initialized():
        return False
    # Workers must find `r1` even when the driver runs from another directory.
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")]))}}
    if cluster.kind == "local":
        if cluster.ray_address:
            ray.init(address=cluster.ray_address, runtime_env=env, log_to_driver=True)
        else:
            # address="local": always a private instance. Without it Ray joins whatever cluster `ray start` last
            # recorded in /tmp/ray (another job's, a test's) and refuses num_cpus there.
            ray.init(address="local", num_cpus=cluster.num_cpus, num_gpus=_local_gpus(cluster), runtime_env=env,
                     include_dashboard=False, log_to_driver=True)
        return True
    if cluster.kind in ("slurm", "k8s"):  # the job's own Ray cluster: the Slurm job script's, or KubeRay's
        ray.init(address=cluster.ray_address or "auto", runtime_env=env, log_to_driver=True)
        return True
    raise ValueError(f"cluster.kind={cluster.kind!r} is not supported; choose one of ['local', 'slurm', 'k8s']")


def placement() -> tuple[str, list[str], list[str | None]]:
    """This Ray worker's node id, the GPU ids Ray gave it, and each GPU's UUID where it can be known: how the health
    monitor maps an NVML device to the workers on it.

    Ray's ids are entries of the node's ``CUDA_VISIBLE_DEVICES`` (indices, or UUIDs where a scheduler set those),
    not NVML indices: under a partial-node Slurm allocation with device cgroups, CUDA's device 0 is whichever GPU the
    job got, NVML's device 0 the node's first. The UUID names the same GPU for both: from CUDA where the worker has
    it, from the id itself where that is a UUID, else unknown (the monitor then falls back to the index)."""
    ids = [str(g) for g in ray.get_gpu_ids()]
    return ray.get_runtime_context().get_node_id(), ids, device_uuids(ids)


def device_uuids(ids: list[str]) -> list[str | None]:
    """The UUID (``GPU-...``, NVML's spelling) of each of this process's visible GPUs, in CUDA's order."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= len(ids):
        return [f"GPU-{torch.cuda.get_device_properties(i).uuid}" for i in range(len(ids))]
    return [g if g.startswith("GPU-") else None for g in ids]


def wait_for_nodes(expected: int, timeout_s: float = 300.0) -> None:
    """Block until ``expected`` Ray nodes are alive: a job's nodes join at their own pace, and a pool placed before
    its nodes are there would wait for them anyway, without saying why."""
    deadline = time.monotonic() + timeout_s
    while (alive := sum(1 for n in ray.nodes() if n["Alive"])) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {alive} of the job's {expected} nodes joined Ray in {timeout_s:.0f} s: see "
                               "their Ray logs (Slurm: ray-<job>-<node>.log in the run directory; Kubernetes: the "
                               "worker pods' logs)")
        time.sleep(1.0)


def _local_gpus(cluster) -> int | None:
    """``cluster.num_gpus``, else none on a machine without CUDA (Ray would count GPUs torch cannot use)."""
    if cluster.num_gpus is not None:
        return cluster.num_gpus
    import torch

    return None if torch.cuda.is_available() else 0
