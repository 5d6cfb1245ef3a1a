"""The driver as KubeRay runs it (``python -m launcher.k8s_job /etc/r1/config.yaml``, the RayJob's entrypoint) on a
real multi-node Ray cluster shaped like the chart's: a head without a pool, and one node per worker group carrying
its pool's resource (what the chart's ``rayStartParams`` give each pod), each node on its own loopback address.
The config is the one ``r1-launch cluster=k8s`` puts in the ConfigMap. A killed driver's retry (KubeRay's
``backoffLimit``) resumes from the checkpoint on the volume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from launcher.k8s import in_cluster
from tests.conftest import TINY, compose

TRAIN_IP, ROLLOUT_IP = "127.0.0.21", "127.0.0.22"


@pytest.mark.slow
def test_the_rayjob_entrypoint_places_each_pool_on_its_group_and_a_retry_resumes(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1}, shutdown_at_exit=False)
    try:
        cluster.add_node(num_cpus=2, resources={"r1_pool_train": 1000}, node_ip_address=TRAIN_IP)
        cluster.add_node(num_cpus=3, resources={"r1_pool_rollout": 1000}, node_ip_address=ROLLOUT_IP)
        cfg = compose([*TINY, "cluster=k8s", f"cluster.k8s.mount_path={tmp_path}", "run_dir=run", "cache_dir=cache",
                       "cluster.k8s.train.gpus=0", "cluster.k8s.rollout.gpus=0", "rollout.num_workers=2",
                       "trainer.total_steps=3", "checkpoint.every_steps=1", "eval.at_start=false",
                       "eval.every_steps=0", "algo.group_size=4", "algo.prompts_per_step=4"])
        config = tmp_path / "config.yaml"  # what the ConfigMap mounts at /etc/r1/config.yaml
        config.write_text(OmegaConf.to_yaml(in_cluster(cfg)))
        run_dir = tmp_path / "run"
        env = {**os.environ, "RAY_ADDRESS": cluster.address}
        command = [sys.executable, "-m", "launcher.k8s_job", str(config)]

        first = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "step_000002" / "driver_state.json").exists():  # the pod is lost here
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-4000:]
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
        first.wait()
        nodes = json.loads((run_dir / "nodes.json").read_text())
        assert nodes == {"train": [TRAIN_IP], "rollout": [ROLLOUT_IP, ROLLOUT_IP]}  # each pool on its group's node

        retry = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                               check=False)  # KubeRay's retry: the same entrypoint, config and volume
        assert retry.returncode == 0, (retry.stdout + retry.stderr)[-4000:]
        assert "resumed from" in retry.stdout + retry.stderr
        steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if "reward/mean" in x]
        assert steps == [1, 2, 3]
        ledger = [json.loads(x) for x in (run_dir / "groups.jsonl").read_text().splitlines()]
        assert len({row["uid"] for row in ledger}) == len(ledger) == 3 * 4
    finally:
        cluster.shutdown()
