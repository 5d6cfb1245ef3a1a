"""The driver inside a KubeRay cluster: ``python -m launcher.k8s_job /etc/r1/config.yaml`` (the RayJob's entrypoint,
run on the Ray head; the config comes from the release's ConfigMap).

Joins the Ray cluster KubeRay started (``RAY_ADDRESS``, else ``auto``), waits for the head and every pod of both
worker groups, and runs the driver. The config ``r1-launch cluster=k8s`` wrote has ``resume: true``: when KubeRay
retries a failed run (``backoffLimit``) on a new cluster, the driver continues from the latest checkpoint on the
volume. Exit code (``r1.monitoring.stop.exit_code``): 0; ``REQUEUE_EXIT`` (75) when the run aborted itself (a sick
GPU, a stall), so that KubeRay retries it on a new cluster; 128 + signal when stopped (the checkpoint is written
first); or the driver's error.
"""

from __future__ import annotations

import logging
import os
import sys

from omegaconf import OmegaConf


def main(config_path: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = OmegaConf.load(config_path)
    cfg.cluster.ray_address = os.environ.get("RAY_ADDRESS") or "auto"
    from r1.cluster import connect, wait_for_nodes
    from r1.monitoring.stop import exit_code
    from r1.stages import run

    connect(cfg.cluster)
    k = cfg.cluster.k8s
    wait_for_nodes(1 + k.train.replicas + k.rollout.replicas)  # the head and every worker pod
    return exit_code(run(cfg))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
