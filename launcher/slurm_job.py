"""The driver inside a Slurm job: ``python -m launcher.slurm_job <run_dir>/config.yaml`` (the last line of the
rendered job script). Runs the resolved config ``r1-launch`` saved at submission on the job's Ray cluster
(``RAY_ADDRESS``, set by the script), once every node of the job has joined it."""

from __future__ import annotations

import logging
import os
import sys
import time

from omegaconf import OmegaConf

NODES_WAIT_S = 300.0


def wait_for_nodes(expected: int, timeout_s: float = NODES_WAIT_S) -> None:
    import ray

    deadline = time.monotonic() + timeout_s
    while (alive := sum(1 for n in ray.nodes() if n["Alive"])) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {alive} of the job's {expected} nodes joined Ray in {timeout_s:.0f} s: "
                               f"see ray-$SLURM_JOB_ID-<node>.log in the run directory")
        time.sleep(1.0)


def main(config_path: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = OmegaConf.load(config_path)
    cfg.cluster.ray_address = os.environ["RAY_ADDRESS"]
    from r1.cluster import connect
    from r1.driver import run

    connect(cfg.cluster)
    wait_for_nodes(int(os.environ.get("R1_EXPECTED_NODES", "1")))
    result = run(cfg)
    return 128 + int(result["stopped_by"]) if result.get("stopped_by") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
